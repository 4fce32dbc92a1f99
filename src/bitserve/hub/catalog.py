"""The catalog: short names for the ternary models bitserve can serve (``data/catalog.json``).

Each entry names a Hugging Face repository, the glob its GGUF file must match, the model
family, its licence and its size as the hub lists it; ``revision`` (a commit) and
``sha256`` pin the exact file where they were checked. ``checked`` says how each entry's
facts were established: nothing in the catalog is guessed, and fields that were not
verified are left empty (a pull then trusts the hub's own LFS metadata, never less).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

SHA256 = re.compile(r"[0-9a-f]{64}")  # a sha256 as the hub writes it (and names blobs)
COMMIT = re.compile(r"[0-9a-f]{40}")  # a git commit id
# owner/name as the hub accepts it (huggingface_hub refuses anything else with a
# traceback): word characters, '-' and '.', neither first nor last, no '--' or '..',
# the name at most 96 characters
REPO_ID = re.compile(
    r"(?!.*(?:--|\.\.))(?=[^/]*/[^/]{1,96}$)\w(?:[\w.-]*\w)?/\w(?:[\w.-]*\w)?", re.ASCII
)


class CatalogError(ValueError):
    """The catalog file is malformed (a bug in bitserve, caught by its tests)."""


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One model. ``file`` is a glob over the repository's file names; ``size_bytes`` the
    file's size as the hub's file list rounds it (None where it was not seen)."""

    name: str
    repo: str
    file: str
    family: str
    arch: str
    description: str
    licence: str
    checked: str
    size_bytes: int | None = None
    revision: str | None = None
    sha256: str | None = None
    aliases: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> CatalogEntry:
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise CatalogError(f"catalog entry {raw.get('name')!r}: unknown keys {sorted(unknown)}")
        try:
            entry = cls(**{**raw, "aliases": tuple(raw.get("aliases", ()))})
        except TypeError as exc:
            raise CatalogError(f"catalog entry {raw.get('name')!r}: {exc}") from None
        entry._check()
        return entry

    def _check(self) -> None:
        problems = []
        if not REPO_ID.fullmatch(self.repo):
            problems.append(f"repo {self.repo!r} is not owner/name")
        if not self.file.endswith(".gguf"):
            problems.append(f"file {self.file!r} is not a .gguf pattern")
        if self.revision is not None and not COMMIT.fullmatch(self.revision):
            problems.append(f"revision {self.revision!r} is not a 40-digit commit")
        if self.sha256 is not None and not SHA256.fullmatch(self.sha256):
            problems.append(f"sha256 {self.sha256!r} is not 64 lowercase hex digits")
        if self.sha256 is not None and self.revision is None:
            problems.append("a pinned sha256 needs a pinned revision")
        if (self.size_bytes is not None and self.size_bytes <= 0) or not self.checked:
            problems.append("size_bytes must be positive, and checked is required")
        if problems:
            raise CatalogError(f"catalog entry {self.name!r}: {'; '.join(problems)}")

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


class Catalog:
    """Entries by name (aliases included, case-insensitive)."""

    def __init__(self, entries: list[CatalogEntry]) -> None:
        self._entries = tuple(entries)
        self._by_name: dict[str, CatalogEntry] = {}
        for entry in entries:
            for name in entry.names:
                key = name.lower()
                if key in self._by_name:
                    raise CatalogError(f"catalog name {name!r} is used twice")
                self._by_name[key] = entry

    @classmethod
    def load(cls) -> Catalog:
        """The catalog shipped with bitserve."""
        text = resources.files("bitserve.data").joinpath("catalog.json").read_text("utf-8")
        return cls.from_json(json.loads(text))

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Catalog:
        if raw.get("version") != 1 or not isinstance(raw.get("models"), list):
            raise CatalogError("catalog: expected {'version': 1, 'models': [...]}")
        return cls([CatalogEntry.from_json(item) for item in raw["models"]])

    def get(self, name: str) -> CatalogEntry | None:
        return self._by_name.get(name.lower())

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
