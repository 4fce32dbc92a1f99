"""The registry file shared by every bitserve process on a machine."""

from __future__ import annotations

from pathlib import Path

from bitserve.hub.registry import ModelRecord, Registry


def record(name: str) -> ModelRecord:
    return ModelRecord(name, f"owner/{name}", f"{name}.gguf", "0" * 40, f"/cache/{name}.gguf",
                       1, None, "bitnet-b1.58", None)  # fmt: skip


def test_two_processes_keep_each_others_records(tmp_path: Path) -> None:
    path = tmp_path / "bitserve" / "models.json"
    # two processes (`serve -hf` and `pull`), each having read the file when it started
    first, second = Registry(path), Registry(path)
    first.put(record("one"))
    second.put(record("two"))
    assert [r.name for r in Registry(path)] == ["one", "two"]
    first.remove("two")  # recorded by the other process since this one read the file
    assert [r.name for r in Registry(path)] == ["one"]
    assert [r.name for r in first] == ["one"]
