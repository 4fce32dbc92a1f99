"""Generator: prompt once then token by token, stops, stop strings, UTF-8, cancel, limits."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitserve.engine import generate as generate_module
from bitserve.engine.generate import ContextLengthError, Generator, StopStringMatcher
from bitserve.engine.sampling import SamplingParamError, log_softmax
from bitserve.engine.types import GenerationRequest, SamplingParams, TokenEvent
from bitserve.tokenizer import Tokenizer

# fixtures from conftest: `scripted(script)` builds a ScriptedModel, `ids` the TokenIds table
Scripted = Callable[..., Any]
Ids = Any
ScriptedModel = Any
GREEDY = SamplingParams(temperature=0.0)
PROMPT = list(b"Hi")  # token ids 0..255 are the single bytes


def request(**kwargs: object) -> GenerationRequest:
    fields: dict[str, object] = {"prompt_tokens": list(PROMPT), "sampling": GREEDY}
    fields.update(kwargs)
    return GenerationRequest(**fields)  # type: ignore[arg-type]


def run(model: ScriptedModel, tokenizer: Tokenizer, req: GenerationRequest) -> list[TokenEvent]:
    return list(Generator(model, tokenizer).generate(req))  # type: ignore[arg-type]


def texts(events: list[TokenEvent]) -> list[str]:
    return [e.text for e in events]


# ---- the decode loop ------------------------------------------------------------------------


def test_prompt_goes_in_one_forward_then_one_token_per_step(
    ids: Ids, scripted: Scripted, tokenizer: Tokenizer
) -> None:
    script = [ids.word(" world"), ids.word("P"), ids.word("ST")]
    model = scripted(script)
    events = run(model, tokenizer, request(max_tokens=3))
    assert [e.token_id for e in events] == script
    assert model.calls == [PROMPT, [script[0]], [script[1]]]  # the last token is never fed
    assert texts(events) == [" world", "P", "ST"]
    assert [e.finish_reason for e in events] == [None, None, "length"]


def test_stop_token_ends_with_stop_and_shows_no_text(
    ids: Ids, scripted: Scripted, tokenizer: Tokenizer
) -> None:
    model = scripted([ids.word(" world"), ids.eot, ids.word("P")])
    events = run(model, tokenizer, request(stop_token_ids={ids.eot}))
    assert [(e.token_id, e.text, e.finish_reason) for e in events] == [
        (ids.word(" world"), " world", None),
        (ids.eot, "", "stop"),
    ]


def test_ignore_eos_generates_past_the_stop_token(
    ids: Ids, scripted: Scripted, tokenizer: Tokenizer
) -> None:
    model = scripted([ids.eot, ids.word("P")])
    events = run(model, tokenizer, request(stop_token_ids={ids.eot}, ignore_eos=True, max_tokens=2))
    assert [e.token_id for e in events] == [ids.eot, ids.word("P")]
    assert events[-1].finish_reason == "length"


def test_utf8_character_split_over_two_tokens_is_emitted_whole(
    ids: Ids, scripted: Scripted, tokenizer: Tokenizer
) -> None:
    e_acute = "é".encode()
    model = scripted([e_acute[0], e_acute[1], ids.word("P")])
    events = run(model, tokenizer, request(max_tokens=3))
    assert texts(events) == ["", "é", "P"]


def test_seeded_sampling_is_reproducible_and_seeds_differ(
    scripted: Scripted, tokenizer: Tokenizer
) -> None:
    def tokens(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=seed)
        return [
            e.token_id
            for e in run(scripted([]), tokenizer, request(sampling=params, max_tokens=20))
        ]

    assert tokens(11) == tokens(11)
    assert tokens(11) != tokens(12)


# ---- stop strings ---------------------------------------------------------------------------


def test_stop_string_across_tokens_is_never_emitted(
    ids: Ids, scripted: Scripted, tokenizer: Tokenizer
) -> None:
    model = scripted([ids.word(" world"), ids.word(" STO"), ids.word("P"), ids.word("Hello")])
    events = run(model, tokenizer, request(stop=[" STOP"]))
    assert texts(events) == [" world", "", ""]
    assert events[-1].finish_reason == "stop"
    assert len(model.calls) == 3  # nothing generated after the stop string


def test_text_after_a_stop_string_inside_one_token_is_dropped(
    ids: Ids, scripted: Scripted, tokenizer: Tokenizer
) -> None:
    model = scripted([ids.word("Hello"), ids.word("end"), ids.word("|>")])
    events = run(model, tokenizer, request(stop=["nd|"]))
    assert "".join(texts(events)) == "Helloe"
    assert events[-1].finish_reason == "stop"


def test_held_back_prefix_is_released_when_it_stops_matching(
    ids: Ids, scripted: Scripted, tokenizer: Tokenizer
) -> None:
    model = scripted([ids.word(" STO"), ids.word(" world")])
    events = run(model, tokenizer, request(stop=[" STOP"], max_tokens=2))
    assert texts(events) == ["", " STO world"]
    assert events[-1].finish_reason == "length"


def test_held_back_prefix_is_flushed_when_generation_ends(
    ids: Ids, scripted: Scripted, tokenizer: Tokenizer
) -> None:
    for script, finish, extra in (
        ([ids.word("Hello"), ids.word(" STO")], "length", {}),
        ([ids.word("Hello"), ids.word(" STO"), ids.eot], "stop", {"stop_token_ids": {ids.eot}}),
    ):
        events = run(
            scripted(script),
            tokenizer,
            request(stop=[" STOP"], max_tokens=2 + bool(extra), **extra),
        )
        assert "".join(texts(events)) == "Hello STO"
        assert events[-1].finish_reason == finish


def test_earliest_of_several_stop_strings_wins(
    ids: Ids, scripted: Scripted, tokenizer: Tokenizer
) -> None:
    model = scripted([ids.word("Hello"), ids.word(" world")])
    events = run(model, tokenizer, request(stop=["world", "lo w"]))
    assert "".join(texts(events)) == "Hel"
    assert events[-1].stop_string == "lo w"  # the event says which one cut the text


def test_stop_string_matcher_holds_only_possible_beginnings() -> None:
    m = StopStringMatcher(["abc", "xy"])
    assert m.feed("zza") == ("zz", None)
    assert m.feed("b") == ("", None)
    assert m.feed("x") == ("ab", None)  # "abx" cannot become "abc"; "x" may become "xy"
    assert m.feed("yq") == ("", "xy")
    empty = StopStringMatcher(["", "q"])
    assert empty.feed("abc") == ("abc", None)  # an empty stop string matches nothing


def test_stop_strings_apply_only_before_the_until_mark() -> None:
    """A tool call's tag: no stop string cuts the call's JSON, however it is fed."""
    m = StopStringMatcher(['"', "<to"], until="<tool_call>")
    assert m.feed("ok <to") == ("ok ", None)  # "<to" may be a stop or the tag: held
    assert m.feed("ol_call>") == ("<tool_call>", None)  # the tag: everything passes now
    assert m.feed('{"name": "f"}') == ('{"name": "f"}', None)
    cut = StopStringMatcher(['"', "<to"], until="<tool_call>")
    assert cut.feed("say <to") == ("say ", None)
    assert cut.feed("day") == ("", "<to")  # "<today" is no tag: the held "<to" is a stop
    before = StopStringMatcher(['"'], until="<tool_call>")
    assert before.feed('a "quote" <tool_call>') == ("a ", '"')  # before the tag: a stop
    split = StopStringMatcher(["x"], until="<tool_call>")
    assert split.feed("<tool") == ("", None)
    assert split.feed("_call>x") == ("<tool_call>x", None)
    never = StopStringMatcher(["x"], until="<tool_call>")
    assert never.feed("<tool") == ("", None)
    assert never.feed("s") == ("<tools", None)  # not the tag after all: released
    assert never.feed("x") == ("", "x")


# ---- limits and cancel ----------------------------------------------------------------------


def test_context_full_ends_with_length(ids: Ids, scripted: Scripted, tokenizer: Tokenizer) -> None:
    model = scripted([ids.word("P")] * 50, context_length=6)
    events = run(model, tokenizer, request(max_tokens=100))
    assert len(events) == 4  # 2 prompt + 4 generated = the context
    assert events[-1].finish_reason == "length"


def test_prompt_longer_than_context_fails_before_any_work(
    ids: Ids, scripted: Scripted, tokenizer: Tokenizer
) -> None:
    model = scripted([ids.word("P")], context_length=4)
    generator = Generator(model, tokenizer)  # type: ignore[arg-type]
    with pytest.raises(ContextLengthError) as info:
        generator.generate(request(prompt_tokens=[1, 2, 3, 4, 5]))
    assert (info.value.prompt_tokens, info.value.context_length) == (5, 4)
    assert model.calls == []


def test_invalid_requests_fail_before_any_work(
    ids: Ids, scripted: Scripted, tokenizer: Tokenizer
) -> None:
    model = scripted([ids.word("P")])
    generator = Generator(model, tokenizer)  # type: ignore[arg-type]
    for req, param in (
        (request(prompt_tokens=[]), "prompt"),
        (request(prompt_tokens=[tokenizer.vocab_size]), "prompt"),
        (request(max_tokens=-1), "max_tokens"),
        (request(top_logprobs=21), "top_logprobs"),
        (request(sampling=SamplingParams(top_p=2.0)), "top_p"),
        (request(sampling=SamplingParams(logit_bias={tokenizer.vocab_size: 1.0})), "logit_bias"),
    ):
        with pytest.raises(SamplingParamError) as info:
            generator.generate(req)
        assert info.value.param == param
    assert model.calls == []


def test_max_tokens_zero_yields_nothing(ids: Ids, scripted: Scripted, tokenizer: Tokenizer) -> None:
    model = scripted([ids.word("P")])
    result = Generator(model, tokenizer).complete(request(max_tokens=0))  # type: ignore[arg-type]
    assert (result.text, result.completion_tokens, result.finish_reason) == ("", 0, "length")
    assert model.calls == []


def test_cancel_ends_the_stream_with_cancelled(
    ids: Ids, scripted: Scripted, tokenizer: Tokenizer
) -> None:
    model = scripted([ids.word("P")] * 50)
    cancel = threading.Event()
    events = []
    for event in Generator(model, tokenizer).generate(request(max_tokens=50), cancel):  # type: ignore[arg-type]
        events.append(event)
        if len(events) == 3:
            cancel.set()
    assert len(events) == 4  # the token sampled after the cancel carries the finish
    assert events[-1].finish_reason == "cancelled"
    assert len(model.calls) == 4


def test_cancel_flushes_held_text(ids: Ids, scripted: Scripted, tokenizer: Tokenizer) -> None:
    cancel = threading.Event()
    cancel.set()
    events = list(
        Generator(scripted([ids.word(" STO")]), tokenizer).generate(request(stop=[" STOP"]), cancel)
    )  # type: ignore[arg-type]
    assert [(e.text, e.finish_reason) for e in events] == [(" STO", "cancelled")]


# ---- logprobs and complete ------------------------------------------------------------------


def test_logprobs_of_chosen_and_top_alternatives(
    ids: Ids, scripted: Scripted, tokenizer: Tokenizer
) -> None:
    model = scripted([ids.word("P"), ids.word(" world")])
    events = run(model, tokenizer, request(max_tokens=2, logprobs=True, top_logprobs=5))
    vocab = tokenizer.vocab_size
    expected = 10.0 - math.log(math.exp(10.0) + vocab - 1)
    for event in events:
        assert event.logprob == pytest.approx(expected, abs=1e-5)
        assert len(event.top_logprobs) == 5
        assert event.top_logprobs[0].token_id == event.token_id
        assert event.top_logprobs[0].text == tokenizer.decode([event.token_id])
        values = [t.logprob for t in event.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-6
        ids = [t.token_id for t in event.top_logprobs[1:]]
        assert ids == sorted(ids)  # the flat rest ties: lowest ids first


def test_no_logprobs_unless_asked(ids: Ids, scripted: Scripted, tokenizer: Tokenizer) -> None:
    events = run(scripted([ids.word("P")]), tokenizer, request(max_tokens=1))
    assert (events[0].logprob, events[0].top_logprobs) == (None, ())


def test_complete_gathers_the_stream(ids: Ids, scripted: Scripted, tokenizer: Tokenizer) -> None:
    model = scripted([ids.word("Hello"), ids.word(" world"), ids.eot])
    result = Generator(model, tokenizer).complete(request(stop_token_ids={ids.eot}))  # type: ignore[arg-type]
    assert result.text == "Hello world"
    assert result.token_ids == [ids.word("Hello"), ids.word(" world"), ids.eot]
    assert (result.finish_reason, result.prompt_tokens, result.completion_tokens) == ("stop", 2, 3)
    assert len(result.events) == 3


# ---- the real model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_path: Path) -> Iterator[Generator]:
    from bitserve.engine.loader import load_model

    loaded = load_model(tiny_model_path, kernel="numpy")
    yield Generator(loaded.model, loaded.tokenizer)
    loaded.close()


def test_real_model_same_seed_same_text(tiny: Generator) -> None:
    prompt = tiny.tokenizer.encode("The cat sat on", add_bos=True)
    params = SamplingParams(temperature=1.0, seed=3)
    a = tiny.complete(GenerationRequest(prompt, params, max_tokens=8))
    b = tiny.complete(
        GenerationRequest(prompt, SamplingParams(temperature=1.0, seed=3), max_tokens=8)
    )
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.completion_tokens == 8


def test_real_model_greedy_matches_argmax_of_forward(tiny: Generator) -> None:
    prompt = tiny.tokenizer.encode("Hello there", add_bos=True)
    result = tiny.complete(GenerationRequest(prompt, SamplingParams(temperature=0.0), max_tokens=4))
    cache = tiny.model.new_cache()
    logits = tiny.model.forward(prompt + result.token_ids[:-1], cache, all_logits=True)
    expected = [int(np.argmax(row)) for row in logits[len(prompt) - 1 :]]
    assert result.token_ids == expected


def test_prompt_logprobs_match_the_forward_pass(
    tiny: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = tiny.tokenizer.encode("One two three four five six seven", add_bos=True)
    cache = tiny.model.new_cache()
    logits = tiny.model.forward(tokens, cache, all_logits=True)
    monkeypatch.setattr(generate_module, "PROMPT_LOGPROBS_CHUNK", 3)  # cross chunk edges
    rows = tiny.prompt_logprobs(tokens, top_n=3)
    assert [r.token_id for r in rows] == tokens
    assert rows[0].logprob is None and rows[0].top == []
    for i, row in enumerate(rows[1:], start=1):
        lp = log_softmax(logits[i - 1])
        assert row.logprob == pytest.approx(float(lp[tokens[i]]), abs=1e-3)
        assert row.top[0].token_id == int(np.argmax(lp))
        assert row.top[0].logprob == pytest.approx(float(lp.max()), abs=1e-5)
        assert len(row.top) == 3
