"""Issue 18 point 6: malformed model metadata is refused at load with one sentence naming
the key (exit status 2 from ``bitserve generate`` and ``bitserve serve``), never a
``ZeroDivisionError``/``TypeError`` traceback, an all-NaN forward or a model that loads
and then fails every chat; and a file claiming 2^31 positions is served within what the
machine holds instead of allocating for them."""

from __future__ import annotations

import math
import resource
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitserve import cli
from bitserve.engine.loader import load_model
from bitserve.gguf.constants import GGMLType, GGUFValueType
from bitserve.gguf.reader import GGUFError, read_gguf
from bitserve.gguf.writer import GGUFWriter
from bitserve.model import BitNetModel
from bitserve.model.demo import demo_tokenizer_metadata
from bitserve.model.synthetic import ModelShape, write_synthetic_model

F32, U32, I32 = GGUFValueType.FLOAT32, GGUFValueType.UINT32, GGUFValueType.INT32
SHAPE = ModelShape(n_layers=2, dim=256, ffn_dim=512, n_heads=4, n_kv_heads=2, vocab_size=2256,
                   context_length=256)  # fmt: skip


@pytest.fixture(scope="module")
def good_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hp") / "good.gguf"
    return write_synthetic_model(path, SHAPE, 5, tokenizer_metadata=demo_tokenizer_metadata())


def with_metadata(src: Path, dst: Path, changes: dict[str, tuple[Any, GGUFValueType]]) -> Path:
    """Copy ``src`` with metadata keys replaced or added (value, type); tensors as they are."""
    w = GGUFWriter()
    with read_gguf(src) as g:
        items = {k: (v, g.metadata_types[k]) for k, v in g.metadata.items()} | changes
        for key, (value, vtype) in items.items():
            w.add(key, value, vtype)
        for name, info in g.tensors.items():
            w.add_tensor(name, g.raw(name).tobytes(), info.ggml_type, info.dims)
    w.write(dst)
    return dst


BAD = [
    (
        "attention.head_count",
        0,
        U32,
        "bitnet-b1.58.attention.head_count is 0; it must be at least 1",
    ),
    ("attention.head_count", 4.0, F32, "attention.head_count is FLOAT32 4.0; expected an integer"),
    ("attention.head_count_kv", 0, U32, "attention.head_count_kv is 0"),
    ("attention.head_count_kv", 2.0, F32, "attention.head_count_kv is FLOAT32"),
    ("attention.head_count", 3, U32, "3 heads do not group over 2 KV heads"),
    ("attention.head_count", 6, U32, "embedding_length 256 is not divisible by 6 heads"),
    ("block_count", 0, U32, "block_count is 0; it must be at least 1"),
    ("embedding_length", 0, U32, "embedding_length is 0"),
    ("feed_forward_length", 0, U32, "feed_forward_length is 0"),
    ("vocab_size", 0, U32, "vocab_size is 0"),
    ("context_length", 0, U32, "context_length is 0"),
    ("context_length", -5, I32, "context_length is -5"),
    ("attention.layer_norm_rms_epsilon", math.nan, F32, "layer_norm_rms_epsilon is nan"),
    ("attention.layer_norm_rms_epsilon", -1e-5, F32, "it must be above 0"),
    ("attention.layer_norm_rms_epsilon", 0.0, F32, "it must be above 0"),
    ("attention.layer_norm_rms_epsilon", math.inf, F32, "below 1"),
    ("attention.layer_norm_rms_epsilon", "1e-5", GGUFValueType.STRING, "expected a number"),
    ("rope.freq_base", math.nan, F32, "rope.freq_base is nan"),
    ("rope.freq_base", 0.0, F32, "rope.freq_base is 0.0"),
    ("rope.freq_base", -10000.0, F32, "rope.freq_base is -10000.0"),
    ("attention.key_length", 33, U32, "head size 33 is odd"),
    ("attention.value_length", 32, U32, "value heads of 32 differ from key heads of 64"),
    ("rope.dimension_count", 32, U32, "partial RoPE (32 of 64)"),
    ("rope.scaling.type", "yarn", GGUFValueType.STRING, "RoPE scaling 'yarn'"),
    ("rope.scaling.type", "longrope", GGUFValueType.STRING, "RoPE scaling 'longrope'"),
    # a factor without a type is linear to llama.cpp (and so is the older key)
    ("rope.scaling.factor", 2.0, F32, "RoPE scaling 'linear' (factor 2.0) is not supported"),
    ("rope.scale_linear", 4.0, F32, "RoPE scaling 'linear' (factor 4.0) is not supported"),
    # sizes only metadata gives are bounded by the file before anything is made to them
    # (4294967295 blocks had the loader build a set of 38 billion names: memory ran out)
    ("block_count", 2**32 - 1, U32, "block_count is 4294967295, but the file has no tensor"),
    ("attention.head_count", 2**31, U32, "head_count is 2147483648; this file allows at most 256"),
    ("attention.head_count_kv", 8, U32, "head_count_kv is 8; this file allows at most 4"),
]


@pytest.mark.parametrize(
    ("key", "value", "vtype", "message"), BAD, ids=[f"{b[0]}={b[1]}" for b in BAD]
)
def test_bad_hyper_parameter_is_one_sentence(
    good_model: Path, tmp_path: Path, key: str, value: Any, vtype: GGUFValueType, message: str
) -> None:
    path = with_metadata(good_model, tmp_path / "bad.gguf", {f"bitnet-b1.58.{key}": (value, vtype)})
    with pytest.raises(GGUFError) as e:
        BitNetModel.load(path, backend="numpy")
    text = str(e.value)
    assert message in text and str(path) in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("key", "value", "vtype", "message"),
    [
        ("bos_token_id", 2000.0, F32, "tokenizer.ggml.bos_token_id is 2000.0, not a token id"),
        ("eos_token_id", 99999, U32, "eos token id 99999 outside the vocabulary of 2256"),
    ],
)  # fmt: skip
def test_bad_special_token_id_is_one_sentence(
    good_model: Path, tmp_path: Path, key: str, value: Any, vtype: GGUFValueType, message: str
) -> None:
    path = with_metadata(
        good_model, tmp_path / "bad.gguf", {f"tokenizer.ggml.{key}": (value, vtype)}
    )
    with pytest.raises(GGUFError) as e:
        load_model(path, kernel="numpy")
    assert message in str(e.value)


def with_tensor(src: Path, dst: Path, name: str, change: Any) -> Path:
    """Copy ``src`` with tensor ``name``'s bytes passed through ``change`` (a copy)."""
    w = GGUFWriter()
    with read_gguf(src) as g:
        for key, value in g.metadata.items():
            w.add(key, value, g.metadata_types[key], g.metadata_array_types.get(key))
        for tensor, info in g.tensors.items():
            raw = g.raw(tensor).copy()
            w.add_tensor(tensor, (change(raw) if tensor == name else raw).tobytes(),
                         info.ggml_type, info.dims)  # fmt: skip
    w.write(dst)
    return dst


def _nan_scale(raw: np.ndarray) -> np.ndarray:  # I2_S: the codes, then the f32 scale
    n_codes = SHAPE.dim * SHAPE.dim // 4
    raw[n_codes : n_codes + 4] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    return raw


def _nan_norm(raw: np.ndarray) -> np.ndarray:
    raw.view(np.float32)[3] = np.inf
    return raw


@pytest.mark.parametrize(
    ("tensor", "change", "says"),
    [("blk.0.attn_q.weight", _nan_scale, "tensor 'blk.0.attn_q.weight': its scales hold NaN"),
     ("blk.1.attn_norm.weight", _nan_norm, "tensor 'blk.1.attn_norm.weight': its values hold")],
)  # fmt: skip
@pytest.mark.parametrize("kernel", ["numpy", None])
def test_non_finite_scales_and_norms_are_refused(
    good_model: Path, tmp_path: Path, tensor: str, change: Any, says: str, kernel: str | None
) -> None:
    """The native kernels turned a NaN scale into finite garbage (off by up to 104)."""
    path = with_tensor(good_model, tmp_path / "nan.gguf", tensor, change)
    with pytest.raises(GGUFError, match="corrupt") as e:
        load_model(path, kernel=kernel)
    assert says in str(e.value)


# one bad value in row 3 of a head of each type: (bits, where in the row)
BAD_ROW = 3
HEAD_POISON = {
    GGMLType.F16: ("<u2", 1, 0x7E00),  # NaN
    GGMLType.BF16: ("<u2", 1, 0xFF80),  # -inf
    GGMLType.F32: ("<u4", 1, 0x7FC00000),
    GGMLType.Q8_0: ("<u2", 17, 0x7C00),  # block 1's d (34 bytes, d first)
    GGMLType.Q6_K: ("<u2", 104, 0x7C01),  # block 0's d (210 bytes, d last)
}


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("kernel", ["numpy", None])
@pytest.mark.parametrize("head", list(HEAD_POISON))
def test_a_head_holding_nan_or_inf_is_refused_naming_its_row(
    tmp_path: Path, head: GGMLType, kernel: str | None, mmap: bool
) -> None:
    """Every token reads the whole head, so one NaN there made every request a 500. The
    native kernels read a private copy (tiled when its rows are whole lines), --mmap the
    file's map: checked wherever the head is read."""
    from bitserve.model.fixtures import write_family_fixture

    good = write_family_fixture(tmp_path / "llama.gguf", "llama", output=head)
    dtype, at, bits = HEAD_POISON[head]
    with read_gguf(good) as g:
        rows = g.tensor_info("output.weight").shape[0]

    def poison(raw: np.ndarray) -> np.ndarray:
        raw.reshape(rows, -1)[BAD_ROW].view(dtype)[at] = bits
        return raw

    load_model(good, kernel=kernel, mmap=mmap).close()
    path = with_tensor(good, tmp_path / "bad.gguf", "output.weight", poison)
    with pytest.raises(GGUFError, match="corrupt") as e:
        load_model(path, kernel=kernel, mmap=mmap)
    assert f"tensor 'output.weight': row {BAD_ROW} holds NaN or infinite values" in str(e.value)


def test_a_ternary_head_with_a_nan_scale_is_refused(tmp_path: Path) -> None:
    from bitserve.model.fixtures import write_family_fixture

    good = write_family_fixture(tmp_path / "qwen3.gguf", "qwen3")  # Q2_0, tied
    path = with_tensor(good, tmp_path / "bad.gguf", "token_embd.weight", _nan_first_q2_0_scale)
    with pytest.raises(GGUFError, match=r"tensor 'token_embd\.weight': its scales hold NaN"):
        load_model(path, kernel="numpy")


def _nan_first_q2_0_scale(raw: np.ndarray) -> np.ndarray:  # a block: f16 d, then the codes
    raw[:2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
    return raw


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"tokenizer.ggml.tokens": (demo_tokenizer_metadata()["tokenizer.ggml.tokens"][:2100],
                                    GGUFValueType.ARRAY),
          "tokenizer.ggml.token_type": (demo_tokenizer_metadata()["tokenizer.ggml.token_type"][
                                        :2100], GGUFValueType.ARRAY)},
         "the tokenizer has 2100 tokens (tokenizer.ggml.tokens) but the model 2256"),
        ({"tokenizer.ggml.tokens": (list(range(2256)), GGUFValueType.ARRAY)},
         "tokenizer.ggml.tokens must be an array of strings"),
    ],
)  # fmt: skip
def test_a_tokenizer_that_does_not_fit_the_model_is_refused(
    good_model: Path, tmp_path: Path, change: dict[str, Any], says: str
) -> None:
    """1200 tokens for a 2256-row model loaded, then every generation failed."""
    path = with_metadata(good_model, tmp_path / "tok.gguf", change)
    with pytest.raises(GGUFError) as e:
        load_model(path, kernel="numpy")
    assert says in str(e.value) and str(path) in str(e.value)


def test_a_projection_is_checked_before_its_rows_are_reordered(tmp_path: Path) -> None:
    """llama's q/k rows are reordered at load: heads of 2^30 asked for a row order of 2^30
    entries per head count before the tensor's shape said otherwise."""
    from bitserve.model.fixtures import write_family_fixture

    good = write_family_fixture(tmp_path / "llama.gguf", "llama")
    huge = {f"llama.{key}": (2**30, U32) for key in ("attention.key_length",
            "attention.value_length", "rope.dimension_count")}  # fmt: skip
    path = with_metadata(good, tmp_path / "heads.gguf", huge)
    before = _rss_mb()
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_q\.weight' has shape"):
        BitNetModel.load(path, backend="numpy")
    assert _rss_mb() - before < 64


def test_a_tokenizer_with_tokens_past_the_embedding_loads(good_model: Path, tmp_path: Path) -> None:
    """bitserve's own converter writes added tokens past config.vocab_size: such a file
    loads (the model never generates those ids; a prompt holding one is refused)."""
    metadata = demo_tokenizer_metadata()
    extra = {"tokenizer.ggml.tokens": ([*metadata["tokenizer.ggml.tokens"], "<extra_0>"],
                                       GGUFValueType.ARRAY),
             "tokenizer.ggml.token_type": ([*metadata["tokenizer.ggml.token_type"], 3],
                                           GGUFValueType.ARRAY)}  # fmt: skip
    path = with_metadata(good_model, tmp_path / "more.gguf", extra)
    loaded = load_model(path, kernel="numpy")
    try:
        assert loaded.tokenizer.vocab_size == loaded.model.config.vocab_size + 1
    finally:
        loaded.close()


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_commands_refuse_a_malformed_model_with_exit_2(
    good_model: Path, tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = with_metadata(good_model, tmp_path / "bad.gguf",
                        {"bitnet-b1.58.attention.head_count": (0, U32)})  # fmt: skip
    extra = ["-p", "hi"] if command == "generate" else ["--port", "1", "--db", str(tmp_path / "db")]
    assert cli.main([command, "-m", str(bad), "--kernel", "numpy", *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "attention.head_count is 0" in lines[0], captured.err
    assert captured.out == ""


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_huge_context_length_is_served_within_the_machine(good_model: Path, tmp_path: Path) -> None:
    """2^31 - 1 positions: the model loads without allocating for them (RoPE tables grow with
    the positions used), serves what the machine's memory holds, and runs."""
    huge = with_metadata(good_model, tmp_path / "huge.gguf",
                         {"bitnet-b1.58.context_length": (2**31 - 1, U32)})  # fmt: skip
    before = _rss_mb()
    with BitNetModel.load(huge, backend="numpy") as model:
        assert _rss_mb() - before < 64
        config = model.config
        assert config.training_context == 2**31 - 1
        positions = config.context_length
        assert 1 <= positions < 2**31 - 1
        assert positions * config.kv_bytes_per_position <= resource.getpagesize() * _phys_pages()
        cache = model.new_cache()  # the default cache spans the served context, lazily
        assert cache.max_seq == positions
        logits = model.forward([1, 2, 3], cache)
        assert np.isfinite(logits).all()
        assert _rss_mb() - before < 64
        cache.release()


def _phys_pages() -> int:
    import os

    return int(os.sysconf("SC_PHYS_PAGES"))


def test_served_context_is_the_file_value_when_it_fits(good_model: Path) -> None:
    with BitNetModel.load(good_model, backend="numpy") as model:
        assert model.config.context_length == model.config.training_context == 256


@pytest.mark.parametrize("name", ["rope_freqs.weight", "rope_factors_long.weight"])
def test_rope_factor_tensors_are_refused(good_model: Path, tmp_path: Path, name: str) -> None:
    """LLaMA-3.1's rope_freqs and LongRoPE's factors (MiniCPM4-based files) change every
    RoPE angle: refused with one sentence, never ignored."""
    path = with_metadata(good_model, tmp_path / "f.gguf", {})
    w = GGUFWriter()
    with read_gguf(path) as g:
        for key, value in g.metadata.items():
            w.add(key, value, g.metadata_types[key], g.metadata_array_types.get(key))
        for tensor, info in g.tensors.items():
            w.add_tensor(tensor, g.raw(tensor).tobytes(), info.ggml_type, info.dims)
    w.add_array(name, np.ones(32, np.float32))
    w.write(tmp_path / "g.gguf")
    with pytest.raises(GGUFError, match=f"RoPE factors \\({name}\\) are not supported"):
        BitNetModel.load(tmp_path / "g.gguf", backend="numpy")
