"""The tensor table, alignment, zero-copy views and F32/F16/BF16 arrays of the reader."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest

from bitserve.gguf import GGMLType, GGUFError, GGUFWriter, read_gguf
from bitserve.gguf.constants import tensor_nbytes
from bitserve.gguf.quants import pack_i2s


def _random_bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()


def _tensor_specs(rng: np.random.Generator) -> dict[str, tuple[GGMLType, tuple[int, ...], bytes]]:
    """name → (type, dims in GGUF order, exact bytes): every type, 1 to 4 dimensions."""
    specs: dict[str, tuple[GGMLType, tuple[int, ...], bytes]] = {}
    for name, gtype, dims in [
        ("norm.weight", GGMLType.F32, (7,)),
        ("embd.weight", GGMLType.F16, (16, 5)),
        ("bf.weight", GGMLType.BF16, (3, 3)),
        ("cube", GGMLType.F32, (2, 3, 4)),
        ("hyper", GGMLType.F16, (2, 1, 3, 2)),
        ("tq2.weight", GGMLType.TQ2_0, (512, 3)),
        ("tq1.weight", GGMLType.TQ1_0, (256, 2)),
    ]:
        n = int(np.prod(dims))
        specs[name] = (gtype, dims, _random_bytes(rng, tensor_nbytes(gtype, n)))
    ternary = rng.integers(-1, 2, size=(3, 256), dtype=np.int8)
    specs["i2s.weight"] = (GGMLType.I2_S, (256, 3), pack_i2s(ternary, 0.25).tobytes())
    return specs


def _write(
    path: Path, specs: dict[str, tuple[GGMLType, tuple[int, ...], bytes]], **kw: int
) -> None:
    w = GGUFWriter(**kw)
    w.add("general.architecture", "test")
    for name, (gtype, dims, data) in specs.items():
        w.add_tensor(name, data, gtype, dims)
    w.write(path)


@pytest.mark.parametrize("alignment", [32, 1, 8, 64, 256])
def test_tensor_table_and_bytes(tmp_path: Path, alignment: int) -> None:
    specs = _tensor_specs(np.random.default_rng(alignment))
    _write(tmp_path / "t.gguf", specs, alignment=alignment)
    with read_gguf(tmp_path / "t.gguf") as gf:
        assert gf.alignment == alignment
        assert ("general.alignment" in gf.metadata) == (alignment != 32)
        assert gf.data_offset % alignment == 0
        assert list(gf.tensors) == list(specs)
        for name, (gtype, dims, data) in specs.items():
            info = gf.tensors[name]
            assert (info.name, info.ggml_type, info.dims) == (name, gtype, dims)
            assert info.shape == tuple(reversed(dims))
            assert info.n_elements == int(np.prod(dims))
            assert info.nbytes == len(data)
            assert (info.offset - gf.data_offset) % alignment == 0
            assert gf.raw(name).tobytes() == data


@pytest.mark.parametrize("pad", range(0, 64, 8))
def test_non_default_alignment_places_the_data_section(tmp_path: Path, pad: int) -> None:
    """Header lengths vary over a whole 64-byte period, so a reader that rounded the data
    section to 32 instead of ``general.alignment`` = 64 would read shifted bytes."""
    rng = np.random.default_rng(pad)
    data = rng.standard_normal(8).astype(np.float32)
    w = GGUFWriter(alignment=64)
    w.add("pad", "x" * pad)
    w.add_array("a", data)
    w.add_array("b", data[::-1].copy())
    w.write(tmp_path / "a.gguf")
    with read_gguf(tmp_path / "a.gguf") as gf:
        np.testing.assert_array_equal(gf.array("a"), data)
        np.testing.assert_array_equal(gf.array("b"), data[::-1])


def _root_buffer(a: np.ndarray) -> object:
    base: object = a
    while isinstance(base, np.ndarray):
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


def test_raw_and_float_arrays_are_views_of_the_map(tmp_path: Path) -> None:
    specs = _tensor_specs(np.random.default_rng(0))
    _write(tmp_path / "t.gguf", specs)
    with read_gguf(tmp_path / "t.gguf") as gf:
        for name in specs:
            raw = gf.raw(name)
            assert raw.dtype == np.uint8
            assert not raw.flags.owndata
            assert not raw.flags.writeable
            assert isinstance(_root_buffer(raw), mmap.mmap)
            assert np.shares_memory(raw, gf.raw(name))  # two calls, one memory: no copies
        for name in ("norm.weight", "embd.weight", "cube", "hyper"):
            assert np.shares_memory(gf.array(name), gf.raw(name))
        assert not np.shares_memory(gf.array("bf.weight"), gf.raw("bf.weight"))  # widened


def test_float_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    f16 = rng.standard_normal((4, 2, 3)).astype(np.float16)
    # bf16 is the top half of an f32: keep those bits, the reader must widen them exactly
    bf16_as_f32 = (
        rng.standard_normal((2, 7)).astype(np.float32).view(np.uint32) & 0xFFFF0000
    ).view(np.float32)
    bf16_bits = (bf16_as_f32.view(np.uint32) >> 16).astype("<u2")
    w = GGUFWriter()
    w.add_array("f32", f32)
    w.add_array("f16", f16)
    w.add_tensor("bf16", bf16_bits, GGMLType.BF16, (7, 2))
    w.write(tmp_path / "f.gguf")
    with read_gguf(tmp_path / "f.gguf") as gf:
        got32, got16, gotbf = gf.array("f32"), gf.array("f16"), gf.array("bf16")
        assert (got32.dtype, got32.shape) == (np.float32, (3, 5))
        assert (got16.dtype, got16.shape) == (np.float16, (4, 2, 3))
        assert (gotbf.dtype, gotbf.shape) == (np.float32, (2, 7))
        np.testing.assert_array_equal(got32, f32)
        np.testing.assert_array_equal(got16, f16)
        np.testing.assert_array_equal(gotbf, bf16_as_f32)


def test_array_of_a_ternary_tensor_and_missing_tensor_are_errors(tmp_path: Path) -> None:
    specs = _tensor_specs(np.random.default_rng(2))
    _write(tmp_path / "t.gguf", specs)
    with read_gguf(tmp_path / "t.gguf") as gf:
        for name in ("i2s.weight", "tq2.weight", "tq1.weight"):
            with pytest.raises(GGUFError, match="not a float type"):
                gf.array(name)
        with pytest.raises(GGUFError, match="missing tensor 'nope'") as exc:
            gf.raw("nope")
        assert exc.value.path == str(tmp_path / "t.gguf")


def test_close_is_idempotent_and_views_outlive_it(tmp_path: Path) -> None:
    specs = _tensor_specs(np.random.default_rng(3))
    _write(tmp_path / "t.gguf", specs)
    gf = read_gguf(tmp_path / "t.gguf")
    view = gf.raw("norm.weight")
    gf.close()
    gf.close()
    assert view.tobytes() == specs["norm.weight"][2]  # the map stays alive while a view does


def test_writer_checks_tensor_sizes() -> None:
    w = GGUFWriter()
    with pytest.raises(ValueError, match="expected"):
        w.add_tensor("x", b"\0" * 5, GGMLType.F32, (2,))
