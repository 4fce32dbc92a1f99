"""The models pulled so far: one JSON file (``models.json`` in bitserve's cache folder)
that records, per model name, the repository, file, commit, path in the Hugging Face
cache, size, sha256 and whether the bytes on disk were checked against it.

The file is rewritten atomically on every change, re-read first under a lock so that
processes pulling at once keep each other's records; a missing file is an empty
registry, and one that cannot be read whole (not JSON, another version, a malformed
record) is a ``RegistryError``: never taken for less than it holds, which the next
write would make final.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from bitserve.hub.errors import (
    AmbiguousModelError,
    RegistryError,
    RegistryWriteError,
    UnknownModelError,
)

REGISTRY_VERSION = 1


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """A pulled file. ``verified_at`` is the Unix time its sha256 last matched ``sha256``
    (None: never checked, or the last check failed)."""

    name: str
    repo: str
    filename: str
    revision: str  # the commit the file was downloaded from
    path: str  # the snapshot path in the Hugging Face cache
    size: int
    sha256: str | None
    family: str | None
    verified_at: float | None

    @property
    def verified(self) -> bool:
        return self.verified_at is not None

    def exists(self) -> bool:
        """True if the file is still on disk with its recorded size."""
        try:
            return os.path.getsize(self.path) == self.size
        except OSError:
            return False

    def with_verification(self, ok: bool) -> ModelRecord:
        return replace(self, verified_at=time.time() if ok else None)

    @classmethod
    def from_json(cls, raw: object) -> ModelRecord:
        """The record ``raw`` (an object of models.json) holds; ``ValueError`` saying
        what is wrong if it is not one."""
        if not isinstance(raw, dict):
            raise ValueError(f"is {type(raw).__name__}, not an object")
        names = [f.name for f in fields(cls)]
        if missing := [n for n in names if n not in raw]:
            raise ValueError(f"lacks {', '.join(missing)}")
        if unknown := sorted(set(raw) - set(names)):
            raise ValueError(f"has unknown fields {', '.join(map(str, unknown))}")
        for name, kinds in _FIELD_TYPES.items():
            value = raw[name]
            if type(value) not in kinds:
                raise ValueError(f"has {name} {value!r}")
        return cls(**raw)


# the JSON types of each field (bool is not an int here)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "repo": (str,),
    "filename": (str,),
    "revision": (str,),
    "path": (str,),
    "size": (int,),
    "sha256": (str, type(None)),
    "family": (str, type(None)),
    "verified_at": (float, int, type(None)),
}


class Registry:
    """Records by name, kept in ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records = self._load()

    @classmethod
    def default(cls) -> Registry:
        from bitserve.model.demo import cache_dir

        return cls(cache_dir() / "models.json")

    def _load(self) -> dict[str, ModelRecord]:
        """The records of the file; one that is malformed is a ``RegistryError`` (dropped,
        it would be gone from the file at the next write)."""
        records: dict[str, ModelRecord] = {}
        listed = self._read().get("models", [])
        if not isinstance(listed, list):
            raise RegistryError(self.path, "its 'models' is not a list")
        for i, raw in enumerate(listed):
            try:
                record = ModelRecord.from_json(raw)
            except ValueError as exc:
                raise RegistryError(self.path, f"its record #{i + 1} {exc}") from None
            records[record.name] = record
        return records

    def _read(self) -> dict[str, Any]:
        """The file's content; none yet is an empty list, anything unreadable a
        ``RegistryError``."""
        try:
            raw = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # unreadable, or not JSON (a torn or hand edit)
            raise RegistryError(self.path, str(exc)) from exc
        if not isinstance(raw, dict) or raw.get("version") != REGISTRY_VERSION:
            version = raw.get("version") if isinstance(raw, dict) else None
            raise RegistryError(
                self.path, f"version {version!r}, this bitserve reads {REGISTRY_VERSION}"
            )
        return raw

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"version": REGISTRY_VERSION, "models": [asdict(r) for r in self]}
        fd, tmp = tempfile.mkstemp(prefix=".models-", suffix=".json", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(body, f, indent=1)
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def __iter__(self) -> Iterator[ModelRecord]:
        return iter(sorted(self._records.values(), key=lambda r: r.name.lower()))

    def get(self, name: str) -> ModelRecord | None:
        return self._records.get(name)

    def find(self, text: str) -> ModelRecord:
        """A record by name, by repository or by file name; ``UnknownModelError`` when
        none is, ``AmbiguousModelError`` when several are."""
        if text in self._records:
            return self._records[text]
        for key in ("repo", "filename"):
            matches = [r for r in self._records.values() if getattr(r, key) == text]
            if len(matches) == 1:
                return matches[0]
            if matches:
                raise AmbiguousModelError(text, sorted(r.name for r in matches))
        raise UnknownModelError(text)

    @contextlib.contextmanager
    def _changing(self) -> Iterator[dict[str, ModelRecord]]:
        """The records as the file holds them now, to change and write back, under an
        exclusive lock: another process (a pull while ``serve -hf`` pulls) may have
        written since this one read the file, and its records must survive."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self.path.with_name(self.path.name + ".lock"), "a")  # noqa: SIM115
        except OSError as exc:
            raise RegistryWriteError(self.path, exc) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._records = self._load()
            before = dict(self._records)
            yield self._records
            if self._records != before:
                try:
                    self._write()
                except OSError as exc:  # a full disk, a read-only folder: the file unchanged
                    raise RegistryWriteError(self.path, exc) from None

    def put(self, record: ModelRecord) -> None:
        """Record ``record``; if it is verified, so is every other name of the same file
        (same blob, same sha256): it was just hashed."""
        with self._changing() as records:
            records[record.name] = record
            if record.verified:
                target = os.path.realpath(record.path)
                for name, other in list(records.items()):
                    same = other.sha256 == record.sha256 and os.path.realpath(other.path) == target
                    if same and not other.verified:
                        records[name] = replace(other, verified_at=record.verified_at)

    def remove(self, name: str) -> None:
        with self._changing() as records:
            records.pop(name, None)

    def users_of(self, path: str) -> list[ModelRecord]:
        """Records whose file resolves to the same blob as ``path``."""
        target = os.path.realpath(path)
        return [r for r in self._records.values() if os.path.realpath(r.path) == target]
