"""llama.cpp-compatible ``/completion``, ``/tokenize``, ``/detokenize`` and OpenAI's
legacy ``/v1/completions`` (thin: the logic is in ``serving.py``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from bitserve.api.auth import require_key, scope_to_caller
from bitserve.api.completions.legacy import LegacyCompletion
from bitserve.api.completions.llama import LlamaCompletion
from bitserve.api.completions.protocol import (
    CompletionRequest,
    DetokenizeRequest,
    LlamaCompletionRequest,
    TokenizeRequest,
)
from bitserve.api.edge import GuardedRoute
from bitserve.api.errors import GENERATING_ERRORS, InvalidParameterError, error_responses
from bitserve.api.served import ServedModel
from bitserve.api.streaming import RequestGuard, sse_response

router = APIRouter(
    tags=["completions"],
    dependencies=[Depends(require_key)],
    route_class=GuardedRoute,
    responses=error_responses(*GENERATING_ERRORS),
)

STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {"description": "JSON, or SSE `data:` events with `stream: true`.",
          "content": {"text/event-stream": {}}}
}  # fmt: skip


def _served(request: Request) -> ServedModel:
    served: ServedModel = request.app.state.served
    return served


async def _answer(
    guard: RequestGuard, stream: bool, job: LlamaCompletion | LegacyCompletion
) -> Response:
    try:
        job.submit(guard)  # a full queue is a 503 before any event
        if stream:
            return sse_response(job.stream(guard), guard)
        return JSONResponse(await job.run(guard))
    except BaseException:
        guard.close()
        raise
    finally:
        if not stream:
            guard.close()


@router.post("/completion", responses=STREAM_DOC)
async def completion(body: LlamaCompletionRequest, request: Request) -> Response:
    """llama.cpp's completion: `prompt` as text or token ids, `n_predict`, sampling fields,
    `n_probs` (→ `completion_probabilities`), `return_tokens`; `stream: true` sends
    llama.cpp's partial objects and a final one with `stop: true` (no `[DONE]`)."""
    job = await run_in_threadpool(LlamaCompletion.plan, _served(request), body)  # tokenizes
    scope_to_caller([job.request], request)
    return await _answer(RequestGuard(request), body.stream, job)


@router.post("/v1/completions", responses=STREAM_DOC)
async def completions(body: CompletionRequest, request: Request) -> Response:
    """OpenAI legacy completions. `echo: true` with `logprobs: N` and `max_tokens: 0`
    scores the prompt (each token's logprob given those before it; the first is null)."""
    job = await run_in_threadpool(LegacyCompletion.plan, _served(request), body)  # tokenizes
    scope_to_caller((c.request for c in job.choices), request)
    return await _answer(RequestGuard(request), body.stream, job)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> Response:
    """Text → token ids (`add_special` prepends BOS; `with_pieces` adds each piece)."""
    served = _served(request)
    served.check_input_chars(len(body.content), "content")
    tok = served.loaded.tokenizer

    def run() -> Response:  # on a worker thread: the text and its JSON may be long
        ids = tok.encode(body.content, add_bos=body.add_special and tok.add_bos)
        if body.with_pieces:
            pieces = [{"id": i, "piece": tok.decode([i], skip_special=False)} for i in ids]
            return JSONResponse({"tokens": pieces})
        return JSONResponse({"tokens": ids})

    return await run_in_threadpool(run)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    """Token ids → text (control tokens included by name)."""
    tok = _served(request).loaded.tokenizer
    bad = [t for t in body.tokens if not 0 <= t < tok.vocab_size]
    if bad:
        raise InvalidParameterError(f"tokens: token id {bad[0]} is not in the vocabulary", "tokens")
    return {"content": await run_in_threadpool(tok.decode, body.tokens, False)}
