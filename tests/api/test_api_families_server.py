"""Greedy generation through the real server process on every family's tiny fixture.

For each family, ``bitserve serve -m <fixture>`` runs as a child process on the family's
published layout, tokenizer kind and, where the family publishes one, chat template
(tests/tokenizer/templates: Falcon3's, Qwen3's; 2B-4T's broken placeholder; the 1bitLLM
base models and BitCPM4 fixtures carry none). A greedy ``/v1/completions`` on token ids
must return exactly the tokens the same model generates in this process (the kernels are
batch- and thread-invariant, so the bits agree), and the official ``openai`` client's
chat completion renders the prompt the file's template gives in process. Stop tokens are
suppressed so that every reply runs its full length.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import requests
from api_server import Server, start

from bitserve.engine.loader import load_model
from bitserve.model.demo import BROKEN_BITNET_TEMPLATE
from bitserve.model.fixtures import FAMILIES, FIXTURE_VOCAB, write_family_fixture
from bitserve.tokenizer.fixtures import tokenizer_metadata

N_TOKENS = 8
TEMPLATES = Path(__file__).resolve().parents[1] / "tokenizer" / "templates"
PUBLISHED_TEMPLATES = {"llama": "falcon3.jinja", "qwen3": "qwen3.jinja"}


def published_tokenizer(family: str) -> dict[str, object]:
    """The family's tokenizer keys with the chat template its published files carry."""
    metadata: dict[str, object] = tokenizer_metadata(FAMILIES[family].tokenizer, FIXTURE_VOCAB)
    if family in PUBLISHED_TEMPLATES:
        metadata["tokenizer.chat_template"] = (TEMPLATES / PUBLISHED_TEMPLATES[family]).read_text()
    elif family == "bitnet-b1.58":  # Microsoft's file stores a broken placeholder
        metadata["tokenizer.chat_template"] = BROKEN_BITNET_TEMPLATE
    return metadata


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, Server]]:
    family: str = request.param
    folder = tmp_path_factory.mktemp(f"serve-{family}")
    ternary = FAMILIES[family].ternary_types[0]
    path = write_family_fixture(folder / f"{family}.gguf", family, ternary, seed=3,
                                tokenizer_metadata=published_tokenizer(family))  # fmt: skip
    server = start(folder, "-m", str(path), "--threads", "1", "--cache-disk", "0")
    yield family, path, server
    server.stop()


def test_greedy_completion_matches_the_model_in_process(
    family_server: tuple[str, Path, Server],
) -> None:
    family, path, server = family_server
    loaded = load_model(path, threads=1)
    try:  # greedy in process, on a float16 KV cache as the server's scheduler keeps
        prompt = loaded.tokenizer.encode("The quick brown fox", add_bos=True)
        stops = sorted(loaded.tokenizer.stop_ids)
        cache = loaded.model.new_cache(64, np.float16)
        logits, generated = loaded.model.forward(prompt, cache), []
        for _ in range(N_TOKENS):
            logits[stops] = -np.inf
            generated.append(int(np.argmax(logits)))
            logits = loaded.model.forward(generated[-1:], cache)
        expected = loaded.tokenizer.decode(generated)
    finally:
        loaded.close()
    body = {"model": "bitnet", "prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0,
            "logit_bias": {str(t): -100 for t in stops}, "logprobs": 1}  # fmt: skip
    r = requests.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length", family
    assert len(choice["logprobs"]["tokens"]) == N_TOKENS
    assert choice["text"] == expected, family
    health = requests.get(f"{server.url}/health", timeout=10).json()
    assert health["arch"] == family and health["model"] == f"tiny {family} fixture (random weights)"


def test_openai_chat_on_each_family(family_server: tuple[str, Path, Server]) -> None:
    family, path, server = family_server
    messages = [{"role": "user", "content": "Hello"}]
    loaded = load_model(path, kernel="numpy")
    try:
        n_prompt = len(loaded.chat.encode(messages))
    finally:
        loaded.close()
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as sdk:
        reply = sdk.chat.completions.create(
            model=f"tiny {family} fixture (random weights)",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=4,
            temperature=0,
        )
    assert reply.choices[0].message.content is not None
    assert reply.model == f"tiny {family} fixture (random weights)"
    assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 4
    assert reply.usage.prompt_tokens == n_prompt  # the file's template, as in process
