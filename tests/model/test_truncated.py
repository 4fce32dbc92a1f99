"""Issue 14 point 6 (BitNet issue #608): a download that stopped early but left a file of
full length (preallocated, the rest zeros) loads today and answers garbage. Any tensor
whose bytes are all one value is refused at load, naming it and saying the file is
probably truncated; a file shorter than its tensor table is refused by the reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitserve.gguf.constants import GGMLType
from bitserve.gguf.reader import GGUFError, read_gguf
from bitserve.model import BitNetModel
from bitserve.model.fixtures import write_family_fixture


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_family_fixture(tmp_path_factory.mktemp("trunc") / "m.gguf", "llama")


def blanked(src: Path, dst: Path, name: str, byte: int = 0, keep: int = 0) -> Path:
    """A copy of ``src`` with tensor ``name``'s bytes set to ``byte`` from byte ``keep`` on
    (the file keeps its length: what a preallocated, unfinished download looks like)."""
    data = bytearray(src.read_bytes())
    with read_gguf(src) as g:
        info = g.tensor_info(name)
    data[info.offset + keep : info.offset + info.nbytes] = bytes([byte]) * (info.nbytes - keep)
    dst.write_bytes(bytes(data))
    return dst


def load_error(path: Path) -> str:
    with pytest.raises(GGUFError) as e:
        BitNetModel.load(path, backend="numpy")
    return str(e.value)


@pytest.mark.parametrize(
    ("name", "byte"),
    [
        ("blk.1.ffn_up.weight", 0x00),  # I2_S codes all 0: every weight -1
        ("blk.0.attn_k.weight", 0x55),  # every weight 0
        ("output.weight", 0x00),  # the F16 head
        ("output_norm.weight", 0x00),  # the last tensor of the file
    ],
)
def test_tensor_of_one_byte_value_is_refused_by_name(
    model: Path, tmp_path: Path, name: str, byte: int
) -> None:
    message = load_error(blanked(model, tmp_path / "z.gguf", name, byte))
    assert f"tensor {name!r}" in message and "probably truncated" in message
    assert "\n" not in message


def test_zero_tail_of_a_file_is_refused(model: Path, tmp_path: Path) -> None:
    """Everything after the middle of layer 1's up projection is zeros (scales included)."""
    with read_gguf(model) as g:
        cut = g.tensor_info("blk.1.ffn_up.weight").offset + 100
    data = bytearray(model.read_bytes())
    data[cut:] = bytes(len(data) - cut)
    path = tmp_path / "tail.gguf"
    path.write_bytes(bytes(data))
    assert "probably truncated" in load_error(path)


@pytest.mark.parametrize("ternary", [GGMLType.TQ2_0, GGMLType.Q2_0])
def test_zeroed_block_scaled_tensor_is_refused(tmp_path: Path, ternary: GGMLType) -> None:
    path = write_family_fixture(tmp_path / "b.gguf", "qwen3", ternary)
    message = load_error(blanked(path, tmp_path / "z.gguf", "blk.0.ffn_down.weight"))
    assert "'blk.0.ffn_down.weight'" in message and "probably truncated" in message


def test_a_healthy_model_with_a_uniform_first_block_still_loads(
    model: Path, tmp_path: Path
) -> None:
    """Only a tensor that is one value throughout is refused: zeros in its first 4 KB (read
    first) with real data after them are not a truncation."""
    path = blanked(model, tmp_path / "head.gguf", "blk.0.ffn_gate.weight")
    data = bytearray(path.read_bytes())
    with read_gguf(model) as g:
        info = g.tensor_info("blk.0.ffn_gate.weight")
        original = g.raw("blk.0.ffn_gate.weight")
        data[info.offset + 8192 : info.offset + info.nbytes] = original[8192:].tobytes()
    path.write_bytes(bytes(data))
    with BitNetModel.load(path, backend="numpy") as m:
        assert m.config.n_layers == 2


def test_file_shorter_than_its_tensor_table_is_refused(model: Path, tmp_path: Path) -> None:
    path = tmp_path / "short.gguf"
    path.write_bytes(model.read_bytes()[:-1000])
    message = load_error(path)
    assert "runs past the end of the file" in message and "truncated" in message
