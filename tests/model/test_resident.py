"""Resident weights (bitserve.model.resident): the streamed arrays leave the file's map for
one arena in forward order, and the model computes the same bits either way."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from bitserve.engine.loader import load_model
from bitserve.gguf.constants import GGMLType
from bitserve.kernels import NativeBackend, TernaryWeight, available_kernels
from bitserve.kernels.tensors import tiled_rows
from bitserve.model import BitNetModel
from bitserve.model.arch import PROJECTIONS
from bitserve.model.fixtures import write_family_fixture
from bitserve.model.resident import ALIGNMENT, Arena


def streamed(model: BitNetModel) -> list[np.ndarray]:
    """Every ternary code array in forward order, then the head's data."""
    arrays = [getattr(layer, p).raw for layer in model.weights.layers for p in PROJECTIONS]
    head = model.weights.head
    assert head.data is not None
    return [*arrays, head.data]


def steps(model: BitNetModel, tokens: list[int]) -> np.ndarray:
    cache = model.new_cache()
    first = model.forward(tokens[:-3], cache, all_logits=True)
    rest = [model.forward(tokens[i : i + 1], cache) for i in range(len(tokens) - 3, len(tokens))]
    return np.concatenate([first, np.stack(rest)])


def test_resident_codes_and_head_are_one_arena_in_forward_order(model_gqa2: Path) -> None:
    with BitNetModel.load(model_gqa2) as mapped, BitNetModel.load(model_gqa2, mmap=True) as viewed:
        arrays = streamed(mapped)
        assert all(mapped.gguf.file_offset(a) is None for a in arrays)  # copies, not the map
        assert all(viewed.gguf.file_offset(a) is not None for a in streamed(viewed))
        starts = [a.ctypes.data for a in arrays]
        assert all(s % ALIGNMENT == 0 for s in starts)
        assert starts == sorted(starts)  # the order a decode step reads them
        ends = [a.ctypes.data + a.nbytes for a in arrays[:-1]]
        gaps = [b - e for e, b in zip(ends, starts[1:], strict=True)]
        assert all(0 <= g < ALIGNMENT for g in gaps)  # back to back: one stream
        for layer, plain_layer in zip(mapped.weights.layers, viewed.weights.layers, strict=True):
            for p in PROJECTIONS:  # the AVX-512 tiles read I2_S codes tiled: the same codes
                w, plain_w = getattr(layer, p), getattr(plain_layer, p)
                assert w.tiled == (mapped.backend.tiles_ternary and w.can_tile)
                assert not plain_w.tiled
                np.testing.assert_array_equal(w.codes(), plain_w.codes())
        head, plain = mapped.weights.head, viewed.weights.head  # the native head reads tiles
        assert head.tiled == mapped.backend.tiles_heads and not plain.tiled
        every_row = np.arange(head.n_rows)
        assert head.data is not None and plain.data is not None
        np.testing.assert_array_equal(tiled_rows(head.data, every_row), plain.data)
        np.testing.assert_array_equal(head.rows(every_row), plain.rows(every_row))


def test_resident_and_mapped_weights_give_the_same_bits(model_gqa4: Path) -> None:
    tokens = [int(t) for t in np.random.default_rng(3).integers(0, 300, 12)]
    with BitNetModel.load(model_gqa4) as a, BitNetModel.load(model_gqa4, mmap=True) as b:
        tiled = [getattr(layer, p).tiled for layer in a.weights.layers for p in PROJECTIONS]
        assert any(tiled) == a.backend.tiles_ternary  # 128-byte rows: tiles differ from rows
        for la, lb in zip(a.weights.layers, b.weights.layers, strict=True):
            for p in PROJECTIONS:
                wa, wb = getattr(la, p), getattr(lb, p)
                np.testing.assert_array_equal(wa.codes(), wb.codes())
                if wa.tiled:  # the arena's bytes are not the file's
                    assert not np.array_equal(wa.raw, wb.raw)
        np.testing.assert_array_equal(steps(a, tokens), steps(b, tokens))


@pytest.mark.parametrize(
    ("family", "ternary"), [("llama", GGMLType.TQ2_0), ("qwen3", GGMLType.Q2_0)]
)
def test_repacked_families_keep_their_copies_and_their_bits(
    family: str, ternary: GGMLType, tmp_path: Path
) -> None:
    """TQ2_0/Q2_0 weights are the loader's own copies (repacked or blocked) either way, tiled
    in place where the kernel reads tiles, and the model's outputs do not depend on it."""
    path = write_family_fixture(tmp_path / f"{family}.gguf", family, ternary, seed=5)
    tokens = [int(t) for t in np.random.default_rng(4).integers(0, 2000, 10)]
    with BitNetModel.load(path) as a, BitNetModel.load(path, mmap=True) as b:
        layer_a, layer_b = a.weights.layers[0], b.weights.layers[0]
        for f in dataclasses.fields(layer_a):
            wa, wb = getattr(layer_a, f.name), getattr(layer_b, f.name)
            if isinstance(wa, TernaryWeight):  # repacked (one scale) or blocked: copies
                assert a.gguf.file_offset(wa.raw) is None and b.gguf.file_offset(wb.raw) is None
                assert wa.tiled == (a.backend.tiles_ternary and wa.can_tile) and not wb.tiled
                np.testing.assert_array_equal(wa.codes(), wb.codes())
        np.testing.assert_array_equal(steps(a, tokens), steps(b, tokens))


def test_the_arena_hands_out_aligned_pieces_and_refuses_to_overflow() -> None:
    arena = Arena(3 * ALIGNMENT)
    first, second = arena.take(10), arena.take(ALIGNMENT)
    assert first.size == 10 and second.ctypes.data - first.ctypes.data == ALIGNMENT
    assert second.ctypes.data % ALIGNMENT == 0
    with pytest.raises(ValueError, match="arena full"):
        arena.take(2 * ALIGNMENT)


def test_load_model_passes_mmap_through(tmp_path: Path) -> None:
    path = write_family_fixture(tmp_path / "b.gguf", "bitnet-b1.58", GGMLType.I2_S, seed=2)
    loaded = load_model(path, mmap=True)
    try:
        head = loaded.model.weights.head.data
        assert head is not None and loaded.model.gguf.file_offset(head) is not None
    finally:
        loaded.close()


def mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def test_repacked_tensors_leave_no_file_pages_mapped(tmp_path: Path) -> None:
    """A repacked tensor's file pages are unmapped once copied (GGUFFile.release): the
    process's resident memory is the model once, not the model and the file's pages."""
    path = write_family_fixture(tmp_path / "f.gguf", "llama", GGMLType.TQ2_0, seed=1)
    with BitNetModel.load(path) as model:
        ternary = sum(
            i.nbytes for i in model.gguf.tensors.values() if i.ggml_type == GGMLType.TQ2_0
        )
        assert ternary > 512 * 1024  # the fixture's TQ2_0 tensors: ~1 MB, all read to repack
        assert mapped_kib(path) * 1024 < ternary / 4  # metadata and 4 KB samples only
        model.forward([1, 2, 3], model.new_cache())  # released pages were copies: unused


def test_an_int8_head_leaves_the_f16_head_in_the_map(tmp_path: Path) -> None:
    """With ``--head int8`` the head kernel reads the int8 copy; the F16 embedding is then
    only read a row at a time, so it is not copied (it stays shared page cache)."""
    path = write_family_fixture(tmp_path / "b.gguf", "bitnet-b1.58", GGMLType.I2_S, seed=2)
    backend = NativeBackend(available_kernels()[0], head="int8")
    with BitNetModel.load(path, backend=backend) as model:
        head = model.weights.head.data
        assert head is not None and model.gguf.file_offset(head) is not None
        assert model.gguf.file_offset(model.weights.layers[0].attn_q.raw) is None


def test_an_int8_head_mode_still_copies_a_head_that_is_not_f16(tmp_path: Path) -> None:
    """``--head int8`` only replaces an F16 head: a BF16 one still runs from its own rows
    every token, so it is copied like every other weight the step streams."""
    path = write_family_fixture(tmp_path / "f.gguf", "llama", GGMLType.TQ2_0, output=GGMLType.BF16)
    backend = NativeBackend(available_kernels()[0], head="int8")
    with BitNetModel.load(path, backend=backend) as model:
        head = model.weights.head
        assert head.kind == "bf16" and head.data is not None
        assert model.gguf.file_offset(head.data) is None
        model.forward([1, 2, 3], model.new_cache())


def open_files(path: Path) -> int:
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if fd.exists() and fd.resolve() == path.resolve())


def test_a_model_that_fails_to_build_closes_its_file(tmp_path: Path) -> None:
    path = write_family_fixture(tmp_path / "b.gguf", "bitnet-b1.58", GGMLType.I2_S, seed=2)

    class Refusing(NativeBackend):
        def decode_plan(self, layers: object, shape: object) -> None:  # type: ignore[override]
            raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        BitNetModel.load(path, backend=Refusing(available_kernels()[0]))
    assert open_files(path) == 0
