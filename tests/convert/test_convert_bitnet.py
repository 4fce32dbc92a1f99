"""``bitserve convert`` on tiny checkpoints in microsoft/bitnet-b1.58-2B-4T's layouts:
the converted GGUF's logits equal, bit for bit, those of the same weights written
directly; the tokenizer encodes and decodes exactly as HF ``tokenizers`` does."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hf_fixtures import (
    hf_tokenizer,
    logits,
    make_model,
    shard_checkpoint,
    write_checkpoint,
    write_direct_gguf,
)
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from bitserve.cli import main
from bitserve.convert import Checkpoint, CheckpointError, convert_checkpoint
from bitserve.convert.ternary import unpack_hf_ternary
from bitserve.convert.tokenizer_json import tokenizer_metadata
from bitserve.gguf import GGMLType, read_gguf
from bitserve.tokenizer import ChatFormatter, Tokenizer


@pytest.mark.parametrize("layout", ["packed", "autobitlinear", "bf16"])
def test_converted_logits_equal_the_same_weights_written_directly(
    layout: str, tokenizer: HFTokenizer, tmp_path: Path
) -> None:
    m = make_model(tokenizer.get_vocab_size(), seed=3)
    folder = write_checkpoint(tmp_path / "hf", m, layout, tokenizer)
    report = convert_checkpoint(Checkpoint(folder), tmp_path / "converted.gguf")
    assert (report.arch, report.n_i2s, report.n_tq2_0) == ("bitnet-b1.58", 7 * m.n_layers, 0)

    converted = read_gguf(report.path)
    metadata = {k: v for k, v in converted.metadata.items() if k.startswith("tokenizer.")}
    direct = write_direct_gguf(tmp_path / "direct.gguf", m, layout, metadata)
    for name, info in converted.tensors.items():  # same bytes, tensor by tensor
        assert info.ggml_type in (GGMLType.I2_S, GGMLType.F16, GGMLType.F32), name
    expected = logits(direct)
    assert np.array_equal(logits(report.path), expected)
    assert np.isfinite(expected).all() and expected.std() > 0
    converted.close()


def test_a_sharded_checkpoint_converts_to_the_same_file(
    tokenizer: HFTokenizer, tmp_path: Path
) -> None:
    m = make_model(tokenizer.get_vocab_size(), seed=4)
    single = write_checkpoint(tmp_path / "single", m, "packed", tokenizer)
    sharded = write_checkpoint(tmp_path / "sharded", m, "packed", tokenizer)
    shard_checkpoint(sharded, 3)
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    a = convert_checkpoint(Checkpoint(single), tmp_path / "a.gguf", name="m").path
    b = convert_checkpoint(Checkpoint(sharded), tmp_path / "b.gguf", name="m").path
    assert a.read_bytes() == b.read_bytes()
    # an index naming a file outside the folder (a hub repository is anyone's) is refused
    index = sharded / "model.safetensors.index.json"
    shards = json.loads(index.read_text())
    first = next(iter(shards["weight_map"]))
    shards["weight_map"][first] = "../single/model.safetensors"
    index.write_text(json.dumps(shards))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        Checkpoint(sharded)


def test_the_tokenizer_round_trips_against_hf_tokenizers(
    tokenizer: HFTokenizer, tmp_path: Path
) -> None:
    m = make_model(tokenizer.get_vocab_size(), seed=1)
    folder = write_checkpoint(tmp_path / "hf", m, "packed", tokenizer)
    path = convert_checkpoint(Checkpoint(folder), tmp_path / "m.gguf").path
    gguf = read_gguf(path)
    ours = Tokenizer.from_gguf(gguf)
    assert gguf.get("tokenizer.ggml.pre") == "llama-bpe"
    assert ours.vocab_size == tokenizer.get_vocab_size()
    assert ours.bos_id == tokenizer.token_to_id("<|begin_of_text|>")
    assert ours.eos_id == tokenizer.token_to_id("<|eot_id|>")
    texts = [
        "Hello, world! I'm here.",
        "x = (a+b) costs $12345\n\n  indented\ttabs",
        "naïve café — 東京 😀 emoji",
        "  leading spaces and trailing   ",
        "<|eot_id|> is text here, <|begin_of_text|> too",
        "",
        "a" * 300,
    ]
    for text in texts:
        hf = tokenizer.encode(text, add_special_tokens=False)
        assert ours.encode(text, allow_special=True) == hf.ids, text
        assert ours.decode(hf.ids, skip_special=False) == tokenizer.decode(
            hf.ids, skip_special_tokens=False
        )
        with_bos = tokenizer.encode(text).ids  # the post-processor adds <|begin_of_text|>
        assert ours.encode(text, add_bos=ours.add_bos, allow_special=True) == with_bos
    # the chat template came along, and renders
    chat = ChatFormatter.from_gguf(gguf, ours)
    rendered = chat.render([{"role": "user", "content": "Hi"}])
    assert rendered.endswith("User: Hi<|eot_id|>Assistant: ")
    gguf.close()


def test_unpacking_matches_transformers_docstring_example() -> None:
    packed = np.array([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], dtype=np.uint8)
    expected = [[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]]
    assert unpack_hf_ternary(packed).tolist() == expected


def test_convert_command_and_its_errors(
    tokenizer: HFTokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = make_model(tokenizer.get_vocab_size(), seed=2)
    folder = write_checkpoint(tmp_path / "hf", m, "packed", tokenizer)
    out = tmp_path / "out" / "model.gguf"
    assert main(["convert", str(folder), str(out)]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"bitserve convert: wrote {out} (bitnet-b1.58, ")
    assert "14 I2_S" in err
    written = read_gguf(out)
    assert written.get("general.name") == "hf"
    written.close()

    (folder / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    assert main(["convert", str(folder), str(out)]) == 1
    assert capsys.readouterr().err == (
        "bitserve convert: config.json's architecture 'GPT2LMHeadModel' cannot be converted; "
        "supported: BitNetForCausalLM, LlamaForCausalLM\n"
    )
    assert main(["convert", str(tmp_path / "nothing-here"), str(out)]) == 2
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        Checkpoint(tmp_path)


def test_a_packed_tensor_holding_code_3_is_one_sentence(
    tokenizer: HFTokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = make_model(tokenizer.get_vocab_size(), seed=3)
    folder = write_checkpoint(tmp_path / "hf", m, "packed", tokenizer)
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    name = "model.layers.0.self_attn.q_proj.weight"
    start = json.loads(raw[8 : 8 + header_len])[name]["data_offsets"][0]
    raw[8 + header_len + start] = 0xFF  # four codes 3: no ternary value
    weights.write_bytes(bytes(raw))
    assert main(["convert", str(folder), str(tmp_path / "out.gguf")]) == 1
    assert capsys.readouterr().err == (
        f"bitserve convert: {name}: packed ternary weights hold code 3, which is not -1, 0 or +1\n"
    )


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda f: (f / "model.safetensors").write_bytes(b"\x10" * 100),
         "cannot convert {folder}: SafetensorError: "),
        (lambda f: _config_set(f, "num_key_value_heads", "two"),
         "config.json: num_key_value_heads must be a positive integer, not 'two'"),
        (lambda f: _config_set(f, "num_key_value_heads", 3),
         "config.json: num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
        (lambda f: _config_set(f, "head_dim", 0),
         "config.json: head_dim must be a positive integer, not 0"),
        (lambda f: _config_set(f, "max_position_embeddings", 4096.5),
         "config.json: max_position_embeddings must be a positive integer, not 4096.5"),
        (lambda f: _config_set(f, "rope_theta", "1e4"),
         "config.json: rope_theta must be a positive number, not '1e4'"),
        (lambda f: _config_set(f, "rms_norm_eps", -1e-5),
         "config.json: rms_norm_eps must be a positive number, not -1e-05"),
        (lambda f: _config_set(f, "rope_scaling", "linear"),
         "config.json: rope_scaling must be an object, not 'linear'"),
        (lambda f: _config_set(f, "rope_scaling", {"factor": "two"}),
         "config.json: rope_scaling.factor must be a positive number, not 'two'"),
        (lambda f: _config_set(f, "hidden_act", ["silu"]),
         "config.json: hidden_act ['silu'] is not relu2 or silu"),
        (lambda f: (f / "tokenizer.json").write_text('{"model": "x"}'),
         "cannot convert {folder}: "),
    ],
)  # fmt: skip
def test_a_checkpoint_no_converter_could_read_is_one_sentence(
    tokenizer: HFTokenizer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: Any,
    says: str,
) -> None:
    """A truncated safetensors file, a config value of the wrong type, a malformed
    tokenizer.json: each was a traceback. A config value is named with what it must be
    (it was the catch-all's "ValueError: invalid literal for int()")."""
    folder = write_checkpoint(tmp_path / "hf", make_model(tokenizer.get_vocab_size()), "packed",
                              tokenizer)  # fmt: skip
    damage(folder)
    assert main(["convert", str(folder), str(tmp_path / "out.gguf")]) == 1
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("bitserve convert: " + says.format(folder=folder)), err
    assert not (tmp_path / "out.gguf").exists()


def _config_set(folder: Path, key: str, value: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))


def test_a_checkpoint_the_loader_would_refuse_is_refused_at_convert(
    tokenizer: HFTokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each of these converted (exit 0) into a file the loader then refused, or (an
    infinite weight_scale) one that loaded with a projection silently zeroed."""
    import dataclasses

    m = make_model(tokenizer.get_vocab_size(), seed=4)
    cases = [
        (write_checkpoint(tmp_path / "act", m, "packed", tokenizer), "hidden_act",
         "config.json: hidden_act 'gelu' is not relu2 or silu"),
        (write_checkpoint(tmp_path / "head", dataclasses.replace(m, output=m.output[:100]),
                          "llama-packed", tokenizer), None, "lm_head is (100, "),
        (write_checkpoint(tmp_path / "inf", m, "autobitlinear", tokenizer,
                          row_scales={"blk.0.attn_q.weight": np.full(m.ternary[
                              "blk.0.attn_q.weight"].shape[0], np.inf, np.float32)}), None,
         "weight_scale must be one positive finite value or one per row"),
    ]  # fmt: skip
    for folder, key, says in cases:
        if key is not None:
            _config_set(folder, key, "gelu")
        assert main(["convert", str(folder), str(tmp_path / "out.gguf")]) == 1
        (err,) = capsys.readouterr().err.strip().splitlines()
        assert says in err, err
        assert not (tmp_path / "out.gguf").exists()


def test_convert_refuses_to_replace_what_is_not_its_output(
    tokenizer: HFTokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It replaced /dev/full with a regular file, a symlink with a file, and the
    checkpoint's own weights."""
    folder = write_checkpoint(tmp_path / "hf", make_model(tokenizer.get_vocab_size()), "packed",
                              tokenizer)  # fmt: skip
    weights = folder / "model.safetensors"
    before = weights.read_bytes()
    assert main(["convert", str(folder), str(weights)]) == 2
    assert "is a file of the checkpoint" in capsys.readouterr().err
    assert weights.read_bytes() == before
    link = tmp_path / "link.gguf"
    link.symlink_to(tmp_path / "target.gguf")
    assert main(["convert", str(folder), str(link)]) == 2
    assert "exists and is not a regular file" in capsys.readouterr().err
    assert link.is_symlink()


def test_added_tokens_and_padding_convert_like_llama_cpp(tmp_path: Path) -> None:
    # a non-special added token (user-defined, type 4) and a model vocabulary larger than
    # the tokenizer's (the gap is [PADn] unused tokens, type 5), as Qwen/Falcon files have
    hf = hf_tokenizer()
    hf.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    size = hf.get_vocab_size()
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    metadata = tokenizer_metadata(json.loads(hf.to_str()), config, size + 5)
    types = metadata["tokenizer.ggml.token_type"]
    assert types[hf.token_to_id("<think>")] == 4 and types[-5:] == [5] * 5
    assert metadata["tokenizer.ggml.tokens"][-1] == f"[PAD{size + 4}]"
    ours = Tokenizer.from_metadata(metadata)
    for text in ["<think>plan</think> then answer", "no tags at all", "a<think>b"]:
        expected = hf.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == hf.decode(expected)


def test_a_failed_write_leaves_no_folders_it_made(
    tokenizer: HFTokenizer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full disk left the empty folders of OUT's path behind."""
    from bitserve.gguf.writer import GGUFWriter

    folder = write_checkpoint(tmp_path / "hf", make_model(tokenizer.get_vocab_size()), "packed",
                              tokenizer)  # fmt: skip

    def full(self: GGUFWriter, path: Path) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(GGUFWriter, "write", full)
    out = tmp_path / "a" / "b" / "x.gguf"
    assert main(["convert", str(folder), str(out)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
