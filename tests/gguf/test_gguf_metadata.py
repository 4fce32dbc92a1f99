"""Metadata of every GGUF value type round-trips through bitserve's writer and reader."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bitserve.gguf import GGUFValueType, GGUFWriter, read_gguf

V = GGUFValueType

# (key, value written, explicit type, value the reader must return)
SCALARS: list[tuple[str, Any, GGUFValueType, Any]] = [
    ("t.u8", 255, V.UINT8, 255),
    ("t.i8", -128, V.INT8, -128),
    ("t.u16", 65535, V.UINT16, 65535),
    ("t.i16", -32768, V.INT16, -32768),
    ("t.u32", 2**32 - 1, V.UINT32, 2**32 - 1),
    ("t.i32", -(2**31), V.INT32, -(2**31)),
    ("t.u64", 2**64 - 1, V.UINT64, 2**64 - 1),
    ("t.i64", -(2**63), V.INT64, -(2**63)),
    ("t.f32", 0.1, V.FLOAT32, float(np.float32(0.1))),
    ("t.f64", math.pi, V.FLOAT64, math.pi),
    ("t.true", True, V.BOOL, True),
    ("t.false", False, V.BOOL, False),
    ("t.str", "héllo ✓ <|eot_id|>\n", V.STRING, "héllo ✓ <|eot_id|>\n"),
    ("t.empty_str", "", V.STRING, ""),
]

# (key, items, element type, value the reader must return)
ARRAYS: list[tuple[str, list[Any], GGUFValueType, list[Any]]] = [
    ("a.u8", [0, 7, 255], V.UINT8, [0, 7, 255]),
    ("a.i8", [-128, 0, 127], V.INT8, [-128, 0, 127]),
    ("a.u16", [0, 65535], V.UINT16, [0, 65535]),
    ("a.i16", [-32768, 32767], V.INT16, [-32768, 32767]),
    ("a.u32", [1, 2**32 - 1], V.UINT32, [1, 2**32 - 1]),
    ("a.i32", [-(2**31), 5], V.INT32, [-(2**31), 5]),
    ("a.u64", [2**64 - 1, 3], V.UINT64, [2**64 - 1, 3]),
    ("a.i64", [-(2**63), 2**63 - 1], V.INT64, [-(2**63), 2**63 - 1]),
    ("a.f32", [0.1, -2.5], V.FLOAT32, [float(np.float32(0.1)), -2.5]),
    ("a.f64", [math.e, -0.0], V.FLOAT64, [math.e, -0.0]),
    ("a.bool", [True, False, True], V.BOOL, [True, False, True]),
    (
        "a.str",
        ["Ġthe", "", "<|begin_of_text|>", "日本"],
        V.STRING,
        ["Ġthe", "", "<|begin_of_text|>", "日本"],
    ),
    ("a.empty", [], V.INT32, []),
    ("a.nested", [[1, 2], [3], []], V.ARRAY, [[1, 2], [3], []]),
    ("a.nested_str", [["a"], ["b", "c"]], V.ARRAY, [["a"], ["b", "c"]]),
    ("a.deep", [[[1.5]], [[2.5, 3.5]]], V.ARRAY, [[[1.5]], [[2.5, 3.5]]]),
]


@pytest.fixture(scope="module")
def every_type_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = GGUFWriter()
    for key, value, vtype, _ in SCALARS:
        w.add(key, value, vtype)
    for key, items, etype, _ in ARRAYS:
        w.add(key, items, V.ARRAY, etype)
    path = tmp_path_factory.mktemp("meta") / "every_type.gguf"
    w.write(path)
    return path


@pytest.mark.parametrize(
    ("key", "value", "vtype", "expected"), SCALARS, ids=[s[0] for s in SCALARS]
)
def test_scalar_round_trip(
    every_type_file: Path, key: str, value: Any, vtype: GGUFValueType, expected: Any
) -> None:
    with read_gguf(every_type_file) as gf:
        got = gf.metadata[key]
        assert gf.metadata_types[key] == vtype
    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize(("key", "items", "etype", "expected"), ARRAYS, ids=[a[0] for a in ARRAYS])
def test_array_round_trip(
    every_type_file: Path, key: str, items: list[Any], etype: GGUFValueType, expected: list[Any]
) -> None:
    with read_gguf(every_type_file) as gf:
        got = gf.metadata[key]
        assert gf.metadata_types[key] == V.ARRAY
        assert gf.metadata_array_types[key] == etype
    assert got == expected
    assert [type(v) for v in got] == [type(v) for v in expected]


def test_negative_zero_and_nan_survive(tmp_path: Path) -> None:
    w = GGUFWriter()
    w.add("f.nan", math.nan, V.FLOAT64)
    w.add("f.negzero", -0.0, V.FLOAT32)
    w.write(tmp_path / "f.gguf")
    with read_gguf(tmp_path / "f.gguf") as gf:
        assert math.isnan(gf.get("f.nan"))
        assert math.copysign(1.0, gf.get("f.negzero")) == -1.0


def test_key_order_and_get_default(every_type_file: Path) -> None:
    with read_gguf(every_type_file) as gf:
        assert list(gf.metadata) == [s[0] for s in SCALARS] + [a[0] for a in ARRAYS]
        assert gf.get("no.such.key", 42) == 42
        assert gf.get("t.u8") == 255
        assert gf.version == 3
        assert gf.tensors == {}


def test_inferred_types(tmp_path: Path) -> None:
    """The writer's documented inference: bool, small/negative/large int, float, str, list."""
    w = GGUFWriter()
    values = {"b": True, "u": 7, "i": -7, "big": 2**40, "neg_big": -(2**40), "f": 0.5, "s": "x"}
    for key, value in values.items():
        w.add(key, value)
    w.add("l", [1, -2, 3])
    w.write(tmp_path / "inf.gguf")
    with read_gguf(tmp_path / "inf.gguf") as gf:
        assert {k: gf.metadata_types[k] for k in values} == {
            "b": V.BOOL,
            "u": V.UINT32,
            "i": V.INT32,
            "big": V.UINT64,
            "neg_big": V.INT64,
            "f": V.FLOAT32,
            "s": V.STRING,
        }
        assert gf.metadata_array_types["l"] == V.INT32
        assert {k: gf.get(k) for k in values} == values
        assert gf.get("l") == [1, -2, 3]


def test_a_failed_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk during `bitserve convert` left `out.gguf.tmp` behind."""
    import builtins

    real_open = builtins.open

    class FullDisk:
        def __init__(self, f: Any) -> None:
            self.f, self.written = f, 0

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, data: bytes) -> int:
            self.written += len(data)
            if self.written > 64:
                raise OSError(28, "No space left on device")
            return int(self.f.write(data))

    def opening(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if str(path).endswith(".tmp") else f

    w = GGUFWriter()
    w.add("general.name", "x" * 200)
    monkeypatch.setattr(builtins, "open", opening)
    with pytest.raises(OSError, match="No space"):
        w.write(tmp_path / "out.gguf")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
