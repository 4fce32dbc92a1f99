"""What the user asked for (``bitnet-2b``, ``owner/repo``, ``owner/repo:VARIANT``), and
which file of a repository answers it.

A catalog name brings its repository, file glob, pins and family. A bare repository gets
the ternary GGUF file bitserve runs best (I2_S, then TQ2_0, TQ1_0, Q2_0); ``:VARIANT``
names the file whose name ends with it, as llama-server's ``-hf repo:quant`` does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from bitserve.hub.catalog import REPO_ID, Catalog, CatalogEntry
from bitserve.hub.errors import AmbiguousFileError, NoMatchingFileError, PullError

# ternary GGUF types bitserve runs, best first, as they appear at the end of file names
RUNNABLE_KINDS = ("i2_s", "tq2_0", "tq1_0", "q2_0_g64", "q2_0")
RUNNABLE_DESCRIPTION = "ternary GGUF file bitserve can run (I2_S, TQ2_0, TQ1_0 or Q2_0)"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A resolved request. ``name`` is how it is recorded and listed: the catalog name,
    or the text given (``owner/repo[:VARIANT]``)."""

    name: str
    repo: str
    pattern: str | None = None  # the catalog's file glob
    variant: str | None = None
    revision: str | None = None  # a pinned commit; None means the repository's main
    sha256: str | None = None  # a pinned sha256 of the file
    family: str | None = None
    entry: CatalogEntry | None = None

    @property
    def wanted(self) -> str:
        """What the file must be, in words (for error messages)."""
        if self.pattern is not None:
            return f"file matching {self.pattern!r}"
        if self.variant is not None:
            return f"GGUF file of variant {self.variant!r}"
        return RUNNABLE_DESCRIPTION

    def choose(self, filenames: Iterable[str]) -> str:
        """The one file of the repository (``filenames``) this spec names. Raises
        :class:`NoMatchingFileError` (listing the GGUF files) or :class:`AmbiguousFileError`."""
        ggufs = sorted(f for f in filenames if f.lower().endswith(".gguf"))
        if self.pattern is not None:
            matches = [f for f in ggufs if fnmatchcase(f, self.pattern)]
        elif self.variant is not None:
            matches = _variant_matches(ggufs, self.variant)
        else:
            matches = _best_ternary(ggufs)
        if not matches:
            raise NoMatchingFileError(self.repo, self.wanted, ggufs)
        if len(matches) > 1:
            raise AmbiguousFileError(self.repo, matches)
        return matches[0]


def resolve(name: str, catalog: Catalog) -> ModelSpec:
    """The spec for ``name``: a catalog name, ``owner/repo`` or ``owner/repo:VARIANT``."""
    entry = catalog.get(name)
    if entry is not None:
        return ModelSpec(
            name=entry.name,
            repo=entry.repo,
            pattern=entry.file,
            revision=entry.revision,
            sha256=entry.sha256,
            family=entry.family,
            entry=entry,
        )
    repo, _, variant = name.partition(":")
    if not REPO_ID.fullmatch(repo) or (":" in name and not variant):
        raise PullError(
            f"{name!r} is neither a catalog name nor a repository (owner/name[:VARIANT]); "
            "`bitserve pull --list` shows the catalog"
        )
    # a catalog repository named by its id is still that family (the file's arch otherwise)
    family = next((e.family for e in catalog if e.repo.lower() == repo.lower()), None)
    return ModelSpec(name=name, repo=repo, variant=variant or None, family=family)


def is_repo_id(text: str) -> bool:
    """True for ``owner/name`` (the shape of a Hugging Face repository id)."""
    return REPO_ID.fullmatch(text) is not None


def file_kind(filename: str) -> str | None:
    """The runnable ternary kind a file name ends with (``i2_s``...), else None."""
    stem = filename.rsplit("/", 1)[-1].lower().removesuffix(".gguf")
    for kind in RUNNABLE_KINDS:
        if stem == kind or re.search(rf"[-._]{kind}$", stem):
            return kind
    return None


def _best_ternary(ggufs: list[str]) -> list[str]:
    ranked = [(RUNNABLE_KINDS.index(kind), f) for f in ggufs if (kind := file_kind(f))]
    if not ranked:
        return []
    best = min(rank for rank, _ in ranked)
    return [f for rank, f in ranked if rank == best]


def _variant_matches(ggufs: list[str], variant: str) -> list[str]:
    """Files whose name ends with ``variant`` (after ``-``, ``.`` or ``_``); failing that,
    files that hold it between separators. Case-insensitive."""
    v = re.escape(variant.lower())
    stems = [(f, f.rsplit("/", 1)[-1].lower().removesuffix(".gguf")) for f in ggufs]
    exact = [f for f, stem in stems if stem == variant.lower() or re.search(rf"[-._]{v}$", stem)]
    if exact:
        return exact
    return [f for f, stem in stems if re.search(rf"(?:^|[-._]){v}(?:$|[-._])", stem)]
