"""Why a pull failed, one class per cause, each ``str()`` one sentence a user can act on.

Every error is a :class:`PullError`; the command line prints ``bitserve pull: <message>``
and exits 1. The hub client's own exceptions (``huggingface_hub.errors``) never reach the
user: :mod:`bitserve.hub.pull` turns each into one of these.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from pathlib import Path

# errno values that mean "the disk (or the user's quota) is full"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class PullError(Exception):
    """A model could not be pulled (or found, or removed); ``str()`` says why in one
    sentence."""


class NoNetworkError(PullError):
    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(
            f"cannot reach the model hub at {endpoint} ({reason}); check the network or "
            "proxy, or pass --offline to use only models already downloaded"
        )
        self.endpoint = endpoint
        self.reason = reason


class RepoNotFoundError(PullError):
    def __init__(self, repo: str) -> None:
        super().__init__(
            f"no repository {repo!r} on the hub (or it is private and HF_TOKEN does not "
            "grant access); check the spelling, or run `bitserve pull --list` for the catalog"
        )
        self.repo = repo


class GatedRepoError(PullError):
    def __init__(self, repo: str, has_token: bool) -> None:
        if has_token:
            problem = "your HF_TOKEN has not been granted access to it"
        else:
            problem = "no HF_TOKEN is set"
        super().__init__(
            f"{repo} is a gated repository and {problem}: accept its licence on its hub page, "
            "then set HF_TOKEN to an access token of that account"
        )
        self.repo = repo


class BadAnswerError(PullError):
    """The hub's answer about a repository (its listing, a file's headers or body) is not
    what a Hugging Face hub sends."""

    def __init__(self, endpoint: str, repo: str, problem: str) -> None:
        super().__init__(
            f"the hub at {endpoint} sent an answer about {repo} that bitserve cannot use "
            f"({problem}); check that HF_ENDPOINT names a Hugging Face hub or mirror, or try "
            "again later"
        )
        self.repo = repo


class UnsafeHeaderError(PullError):
    """The hub named a commit or file version with something that is not a plain name:
    ``huggingface_hub`` names cache paths after these headers, so it would write outside
    the cache (``X-Linked-Etag: "../../.bashrc"``)."""

    def __init__(self, url: str, header: str, value: str) -> None:
        shown = value if len(value) <= 80 else value[:77] + "..."
        super().__init__(
            f"the hub answered {header} {shown!r} for {url}, which is not a plain name; "
            "nothing was downloaded (is HF_ENDPOINT a Hugging Face hub you trust?)"
        )
        self.header = header


class OversizeTransferError(PullError):
    """A download brought more bytes than the hub lists for the file (stopped there)."""

    def __init__(self, url: str, size: int) -> None:
        super().__init__(
            f"the download from {url} went on past the {size} bytes the hub lists for the "
            "file; stopped and deleted (is HF_ENDPOINT a Hugging Face hub you trust?)"
        )


class HubSilentError(PullError):
    """The hub gave no answer about a file's metadata (the request before its download)
    within the time allowed, retries included."""

    def __init__(self, host: str, filename: str, timeout_s: float) -> None:
        super().__init__(
            f"the hub at {host} has not answered about {filename} for {timeout_s:.0f} s, "
            "retries included; nothing was downloaded: try again later, or check the network "
            "or proxy"
        )
        self.filename = filename


class StalledTransferError(PullError):
    """A download ran slower than a trickle (under 1 kB/s over the stall window)."""

    def __init__(self, filename: str, arrived: int, elapsed_s: float) -> None:
        super().__init__(
            f"the download of {filename} brought {format_size(arrived)} in {elapsed_s:.0f} s "
            "(under 1 kB/s) and was stopped; try again later, or set BITSERVE_PULL_STALL_S "
            "to the seconds a slow link may take to bring 1 kB/s on average (0: never stop)"
        )
        self.filename = filename


class RateLimitedError(PullError):
    def __init__(self, host: str, wait_s: int) -> None:
        super().__init__(
            f"the hub at {host} is limiting this machine's requests and asks it to wait "
            f"{wait_s} s; try again later (requests with an HF_TOKEN get a higher limit)"
        )


class RevisionNotFoundError(PullError):
    def __init__(self, repo: str, revision: str) -> None:
        super().__init__(f"{repo} has no revision {revision!r}")
        self.repo = repo


class NoMatchingFileError(PullError):
    """The repository holds no file the request (or bitserve) can use."""

    def __init__(self, repo: str, wanted: str, candidates: Sequence[str]) -> None:
        listed = ", ".join(candidates) if candidates else "none"
        super().__init__(f"{repo} has no {wanted}; its GGUF files: {listed}")
        self.repo = repo
        self.candidates = tuple(candidates)


class AmbiguousFileError(PullError):
    def __init__(self, repo: str, matches: Sequence[str]) -> None:
        super().__init__(
            f"{repo} has several files that match: {', '.join(matches)}; "
            f"name one as {repo}:VARIANT (e.g. {repo}:{_variant_hint(matches[0])})"
        )
        self.repo = repo
        self.candidates = tuple(matches)


class DiskFullError(PullError):
    def __init__(self, directory: Path, needed: int | None, free: int | None) -> None:
        amounts = ""
        if needed is not None and free is not None:
            amounts = f" ({format_size(needed)} needed, {format_size(free)} free)"
        super().__init__(
            f"not enough disk space in {directory}{amounts}; free some space, or set "
            "HF_HUB_CACHE to a folder on a larger disk"
        )
        self.directory = directory


class VerificationError(PullError):
    """The downloaded bytes are not the file the hub published; the file was deleted."""

    def __init__(self, filename: str, problem: str) -> None:
        super().__init__(
            f"{filename} failed verification ({problem}); the file was deleted: "
            "run the same command again to download it anew"
        )
        self.filename = filename


class UnreadableModelError(PullError):
    """The file arrived as the hub lists it, but is no GGUF file bitserve can read (a
    page saved under a .gguf name, a file truncated before it was uploaded); deleted."""

    def __init__(self, filename: str, problem: str) -> None:
        super().__init__(
            f"{filename} is not a model bitserve can read ({problem}); the file was deleted "
            "and not recorded"
        )
        self.filename = filename


class UnrunnableModelError(PullError):
    """The file arrived whole and verified and is a GGUF file, of a kind this bitserve
    cannot run (an architecture or tensor type it lacks): kept and recorded, not deleted
    (a user waited for it; a newer bitserve or another tool can use it)."""

    def __init__(self, filename: str, name: str, size: str, problem: str) -> None:
        super().__init__(
            f"{filename} is a GGUF file this version of bitserve cannot run ({problem}); its "
            f"{size} are kept as {name}, so a version that runs it needs no new download "
            f"(`bitserve rm {name}` deletes it)"
        )
        self.filename = filename


class NotCachedError(PullError):
    def __init__(self, name: str, why: str, command: str | None = None) -> None:
        command = command or f"pull {name}"
        super().__init__(
            f"{name} is not downloaded and {why}; run `bitserve {command}` while online"
        )
        self.name = name


class UnknownModelError(PullError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no downloaded model is called {name!r}; `bitserve models` lists them")
        self.name = name


class AmbiguousModelError(PullError):
    def __init__(self, text: str, names: list[str]) -> None:
        super().__init__(
            f"{text!r} names {len(names)} downloaded models ({', '.join(names)}); "
            "say which by its name"
        )


class RegistryError(PullError):
    """The list of pulled models cannot be read: said, never taken for an empty list
    (which a later pull would write over)."""

    def __init__(self, path: object, why: str) -> None:
        super().__init__(
            f"the list of downloaded models {path} cannot be read ({why}); move it away and "
            "pull again (the model files stay in the Hugging Face cache)"
        )


class RegistryWriteError(PullError):
    """The list of pulled models cannot be written; it is left as it was."""

    def __init__(self, path: object, exc: OSError) -> None:
        super().__init__(
            f"the list of downloaded models {path} cannot be written ({exc.strerror or exc}) "
            "and is unchanged; make room or fix its folder, then run the same command again"
        )


def is_disk_full(exc: BaseException) -> bool:
    """True for an ``OSError`` that means the disk or quota is full."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def format_size(n_bytes: int) -> str:
    """``1.19 GB``-style (decimal units, as the hub shows sizes)."""
    size = float(n_bytes)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _variant_hint(filename: str) -> str:
    stem = filename.rsplit("/", 1)[-1].removesuffix(".gguf")
    return stem.rsplit("-", 1)[-1]
