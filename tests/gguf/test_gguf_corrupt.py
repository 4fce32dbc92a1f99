"""Corrupt GGUF input: every problem raises GGUFError naming the file and the problem."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from bitserve.gguf import GGMLType, GGUFError, GGUFValueType, GGUFWriter, read_gguf
from bitserve.gguf.quants import pack_i2s

STRING_VALUE = "a string value long enough to cut inside"


def _valid_file(path: Path) -> bytes:
    """A small valid file: metadata (incl. a string and a string array), then two tensors
    ``alpha`` (F32 [8, 4]) and ``beta`` (I2_S, ne0 = 128, ne1 = 2)."""
    rng = np.random.default_rng(0)
    w = GGUFWriter()
    w.add("general.architecture", "test")
    w.add("test.string", STRING_VALUE)
    w.add("test.tokens", ["<s>", "</s>", "hello"])
    w.add("test.count", 3)
    w.add_array("alpha", rng.standard_normal((8, 4)).astype(np.float32))
    ternary = rng.integers(-1, 2, size=(2, 128), dtype=np.int8)
    w.add_tensor("beta", pack_i2s(ternary, 0.5), GGMLType.I2_S, (128, 2))
    w.write(path)
    with read_gguf(path):
        pass  # the fixture itself must be valid
    return path.read_bytes()


@pytest.fixture
def valid(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "model.gguf"
    return path, _valid_file(path)


def _tensor_fields(data: bytes, name: str) -> tuple[int, int, int]:
    """Byte positions of ``name``'s n_dims, type and offset fields in the tensor table."""
    encoded = name.encode()
    n_dims_at = data.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)
    (n_dims,) = struct.unpack_from("<I", data, n_dims_at)
    type_at = n_dims_at + 4 + 8 * n_dims
    return n_dims_at, type_at, type_at + 4


def _patch(data: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def _expect_error(path: Path, data: bytes | None, *fragments: str) -> GGUFError:
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(GGUFError) as exc:
        read_gguf(path)
    err = exc.value
    assert str(path) in str(err)
    assert err.path == str(path)
    for fragment in fragments:
        assert fragment in err.problem, err.problem
    return err


def test_bad_magic(valid: tuple[Path, bytes]) -> None:
    path, data = valid
    _expect_error(path, b"GGML" + data[4:], "not a GGUF file", "GGML")


@pytest.mark.parametrize("version", [0, 1, 4, 2**31])
def test_unsupported_version(valid: tuple[Path, bytes], version: int) -> None:
    path, data = valid
    _expect_error(path, _patch(data, 4, "<I", version), "unsupported GGUF version", str(version))


def test_big_endian_file_is_named(valid: tuple[Path, bytes]) -> None:
    path, data = valid
    _expect_error(path, _patch(data, 4, ">I", 3), "big-endian")


def _cut_points(data: bytes) -> dict[str, int]:
    string_at = data.index(STRING_VALUE.encode())
    beta_name_at = data.index(b"beta")
    return {
        "header": 10,
        "metadata": string_at + 5,
        "tensor table": beta_name_at + 2,
        "tensor table fields": _tensor_fields(data, "beta")[1] + 2,
        "data": len(data) - 40,
        "last byte": len(data) - 1,
    }


@pytest.mark.parametrize(
    "where", ["header", "metadata", "tensor table", "tensor table fields", "data", "last byte"]
)
def test_truncated_file(valid: tuple[Path, bytes], where: str) -> None:
    path, data = valid
    cut = _cut_points(data)[where]
    _expect_error(path, data[:cut], "truncated")


def test_every_truncation_is_a_gguf_error(valid: tuple[Path, bytes]) -> None:
    """Cutting the file at any byte gives GGUFError: never another exception, never success."""
    path, data = valid
    for cut in range(len(data)):
        _expect_error(path, data[:cut])


def test_random_corruption_never_crashes(valid: tuple[Path, bytes]) -> None:
    """Random byte changes either still parse or raise GGUFError, nothing else."""
    path, data = valid
    rng = np.random.default_rng(1)
    header_end = data.index(b"beta") + 40  # corrupt the parsed part, not just tensor bytes
    for _ in range(300):
        corrupt = bytearray(data)
        for at in rng.integers(0, header_end, size=rng.integers(1, 4)):
            corrupt[at] = rng.integers(0, 256)
        path.write_bytes(bytes(corrupt))
        try:
            read_gguf(path).close()
        except GGUFError as e:
            assert e.path == str(path)


def test_tensor_past_end_of_file(valid: tuple[Path, bytes]) -> None:
    path, data = valid
    _, _, offset_at = _tensor_fields(data, "beta")
    _expect_error(path, _patch(data, offset_at, "<Q", 2**20), "'beta'", "runs past the end")


@pytest.mark.parametrize("type_id", [2, 12, 37, 99, 2**32 - 1])
def test_unknown_tensor_type(valid: tuple[Path, bytes], type_id: int) -> None:
    path, data = valid
    _, type_at, _ = _tensor_fields(data, "alpha")
    _expect_error(
        path, _patch(data, type_at, "<I", type_id), "'alpha'", f"unsupported type {type_id}"
    )


def test_i2s_row_length_not_multiple_of_128(valid: tuple[Path, bytes]) -> None:
    path, data = valid
    n_dims_at, _, _ = _tensor_fields(data, "beta")
    # same element count (and bytes), rows of 64: a block would cross a row
    patched = _patch(_patch(data, n_dims_at + 4, "<Q", 64), n_dims_at + 12, "<Q", 4)
    _expect_error(path, patched, "I2_S", "'beta'", "row length 64", "multiple of 128")


def test_absurd_string_length(valid: tuple[Path, bytes]) -> None:
    path, data = valid
    length_at = data.index(STRING_VALUE.encode()) - 8
    _expect_error(path, _patch(data, length_at, "<Q", 2**60), "absurd", "test.string")


def test_absurd_array_count(valid: tuple[Path, bytes]) -> None:
    path, data = valid
    count_at = data.index(b"test.tokens") + len("test.tokens") + 4 + 4
    _expect_error(path, _patch(data, count_at, "<Q", 2**60), "absurd", "test.tokens")


@pytest.mark.parametrize(("at", "what"), [(8, "tensor count"), (16, "metadata count")])
def test_absurd_header_counts(valid: tuple[Path, bytes], at: int, what: str) -> None:
    path, data = valid
    _expect_error(path, _patch(data, at, "<Q", 2**60), "absurd", what.split()[0])


def test_absurd_dimension(valid: tuple[Path, bytes]) -> None:
    path, data = valid
    n_dims_at, _, _ = _tensor_fields(data, "alpha")
    _expect_error(path, _patch(data, n_dims_at + 4, "<Q", 2**62), "'alpha'", "past the end")


@pytest.mark.parametrize("n_dims", [0, 5, 2**31])
def test_bad_dimension_count(valid: tuple[Path, bytes], n_dims: int) -> None:
    path, data = valid
    n_dims_at, _, _ = _tensor_fields(data, "alpha")
    _expect_error(path, _patch(data, n_dims_at, "<I", n_dims), "'alpha'", "dimensions")


def test_unaligned_offset(valid: tuple[Path, bytes]) -> None:
    path, data = valid
    _, _, offset_at = _tensor_fields(data, "beta")
    (offset,) = struct.unpack_from("<Q", data, offset_at)
    _expect_error(path, _patch(data, offset_at, "<Q", offset + 4), "'beta'", "not aligned to 32")


def test_overlapping_tensors(valid: tuple[Path, bytes]) -> None:
    path, data = valid
    _, _, offset_at = _tensor_fields(data, "beta")
    _expect_error(path, _patch(data, offset_at, "<Q", 0), "'alpha'", "'beta'", "overlap")


def test_duplicate_tensor_name(tmp_path: Path) -> None:
    w = GGUFWriter()
    w.add_array("same", np.zeros(4, dtype=np.float32))
    w.add_array("same", np.ones(4, dtype=np.float32))
    w.write(tmp_path / "dup.gguf")
    _expect_error(tmp_path / "dup.gguf", None, "duplicate tensor name", "'same'")


def test_duplicate_metadata_key(tmp_path: Path) -> None:
    w = GGUFWriter()
    w.add("general.name", "first")
    w.add("general.name", "second")
    w.write(tmp_path / "dupkey.gguf")
    _expect_error(tmp_path / "dupkey.gguf", None, "duplicate metadata key", "general.name")


def test_unknown_metadata_value_type(valid: tuple[Path, bytes]) -> None:
    path, data = valid
    type_at = data.index(b"test.count") + len("test.count")
    _expect_error(
        path, _patch(data, type_at, "<I", 13), "test.count", "unknown metadata value type 13"
    )


def test_invalid_utf8_string(valid: tuple[Path, bytes]) -> None:
    path, data = valid
    at = data.index(STRING_VALUE.encode())
    _expect_error(path, data[:at] + b"\xff" + data[at + 1 :], "test.string", "UTF-8")


@pytest.mark.parametrize("alignment", [0, 3, 48])
def test_bad_alignment(tmp_path: Path, alignment: int) -> None:
    w = GGUFWriter()
    w.add("general.alignment", alignment, GGUFValueType.UINT32)
    w.write(tmp_path / "align.gguf")
    _expect_error(tmp_path / "align.gguf", None, "general.alignment", "power of two")


def test_arrays_nested_too_deep(tmp_path: Path) -> None:
    """A 12-byte-per-level nesting would exhaust the stack without a limit."""
    levels = 100_000
    body = struct.pack("<IQ", GGUFValueType.ARRAY, 1) * levels + struct.pack("<IQ", 5, 0)
    key = b"deep"
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<I", GGUFValueType.ARRAY) + body
    _expect_error_bytes = tmp_path / "deep.gguf"
    _expect_error(_expect_error_bytes, header + kv, "'deep'", "nested deeper")


def test_empty_file(tmp_path: Path) -> None:
    _expect_error(tmp_path / "empty.gguf", b"", "empty file")


def test_missing_file(tmp_path: Path) -> None:
    _expect_error(tmp_path / "missing.gguf", None, "cannot open", "No such file")


def test_directory(tmp_path: Path) -> None:
    _expect_error(tmp_path, None, "cannot open")


def test_gguf_error_is_a_value_error(tmp_path: Path) -> None:
    err = _expect_error(tmp_path / "missing.gguf", None)
    assert isinstance(err, ValueError)
    assert str(err) == f"{tmp_path / 'missing.gguf'}: {err.problem}"
