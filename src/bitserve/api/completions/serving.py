"""Text completions: llama.cpp's ``/completion`` (:mod:`.llama`) and OpenAI's legacy
``/v1/completions`` (:mod:`.legacy`).

Both tokenize a raw prompt (text gets the model's BOS; token ids are used as given),
build one engine request per choice (here) and shape the events their own way.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitserve.api.completions.protocol import LlamaCompletionRequest
from bitserve.api.errors import InvalidParameterError
from bitserve.api.sampling import SamplingFields, to_sampling_params, wire_names
from bitserve.api.served import ServedModel
from bitserve.engine.types import GenerationRequest, TokenEvent


@dataclass(slots=True)
class Prompt:
    """Token ids to run, and how many leading ids the server added (BOS)."""

    tokens: list[int]
    added: int = 0


def tokenize_prompt(
    served: ServedModel, prompt: str | list[int], param: str = "prompt", special: bool = False
) -> Prompt:
    """Token ids as given, or the text's ids after the model's BOS; with ``special``,
    control-token text in it (``<|eot_id|>``) becomes the control token, as llama.cpp's
    ``/completion`` parses it (and no second BOS when the text starts with one)."""
    if isinstance(prompt, list):
        vocab = served.loaded.tokenizer.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidParameterError(
                f"{param}: token id {bad[0]} is not in the vocabulary", param
            )
        return Prompt(list(prompt))
    served.check_input_chars(len(prompt), param)
    tok = served.loaded.tokenizer
    tokens = tok.encode(prompt, allow_special=special)
    if tok.add_bos and tok.bos_id is not None and not (tokens and tokens[0] == tok.bos_id):
        return Prompt([tok.bos_id, *tokens], 1)
    return Prompt(tokens)


def engine_request(
    served: ServedModel,
    prompt: Prompt,
    fields: SamplingFields,
    max_tokens: int,
    stop: list[str],
    top_n: int,
    seed: int | None = None,
    ignore_eos: bool = False,
    logprobs: bool = False,
) -> GenerationRequest:
    """One validated engine request; ``max_tokens`` -1 means until the context is full."""
    room = served.check_fits(len(prompt.tokens), "prompt")
    req = GenerationRequest(
        prompt_tokens=prompt.tokens,
        sampling=to_sampling_params(fields, served.loaded.tokenizer.vocab_size, seed),
        max_tokens=room if max_tokens < 0 else min(max_tokens, room),
        stop=stop,
        stop_token_ids=served.stop_token_ids,
        ignore_eos=ignore_eos,
        logprobs=logprobs or top_n > 0,
        top_logprobs=top_n,
    )
    with wire_names(
        {"max_tokens": "n_predict" if isinstance(fields, LlamaCompletionRequest) else "max_tokens"}
    ):
        served.generator.check_request(req)
    return req


async def no_events() -> list[TokenEvent]:
    """The events of a choice that generates nothing (``max_tokens: 0`` scoring)."""
    return []
