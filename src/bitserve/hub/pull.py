"""Pull a model into the Hugging Face cache with ``huggingface_hub``, verify it, record it.

``huggingface_hub`` does the transfer: its cache layout (``models--owner--name/blobs``,
``snapshots/<commit>``), ETag revalidation, ``Range`` resume after a dropped connection,
``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``, and a progress bar
on a terminal (none otherwise). This module adds what it does not do: it picks the file,
checks the size and sha256 of what arrived against the hub's LFS metadata (deleting a
file that does not match), records the result (:mod:`bitserve.hub.registry`), and turns
every failure into one :class:`~bitserve.hub.errors.PullError` sentence.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from filelock import FileLock, Timeout
from huggingface_hub import HfApi, constants, get_token, hf_hub_download, try_to_load_from_cache
from huggingface_hub import errors as hf_errors
from huggingface_hub.file_download import repo_folder_name

from bitserve.hub.catalog import COMMIT, SHA256
from bitserve.hub.errors import (
    BadAnswerError,
    DiskFullError,
    GatedRepoError,
    NoNetworkError,
    NotCachedError,
    OversizeTransferError,
    PullError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnreadableModelError,
    UnrunnableModelError,
    VerificationError,
    format_size,
    is_disk_full,
)
from bitserve.hub.registry import ModelRecord, Registry
from bitserve.hub.session import (
    bounded_listing,
    bounded_metadata_wait,
    bounded_transfers,
    guard_session,
    log_hub_once,
    stopping_signals_unwind,
)
from bitserve.hub.spec import ModelSpec

_HASH_CHUNK = 1 << 20
# Unicode categories no file name bitserve writes or prints may hold: controls (C0, C1),
# format characters (bidirectional overrides, zero-width), lone surrogates, line breaks
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# huggingface_hub's OSError for a transfer that ended at another size than announced
_SIZE_MISMATCH = re.compile(
    r"Consistency check failed: file should be of size (\d+) but has size (\d+)"
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}


def _stall_s_from_env() -> float | None:
    """``BITSERVE_PULL_STALL_S``: 60 s unset, None (never stop) at 0."""
    text = os.environ.get("BITSERVE_PULL_STALL_S", "").strip()
    if not text:
        return 60.0
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise PullError(
            f"BITSERVE_PULL_STALL_S is {text!r}; set it to the seconds over which a download "
            "must average 1 kB/s (60 if unset, 0: never stop a slow download)"
        )
    return seconds or None


@dataclass(frozen=True, slots=True)
class HubOptions:
    """Where and how to reach the hub. ``None`` fields take ``huggingface_hub``'s defaults
    (``HF_ENDPOINT``, ``HF_HUB_CACHE``, ``HF_TOKEN`` or the stored login)."""

    endpoint: str | None = None
    cache_dir: Path | None = None
    token: str | bool | None = None  # False: never send one
    offline: bool = False
    # seconds the hub may take to answer about a repository (its listing) or a file (its
    # metadata, retries included): huggingface_hub sets no limit on the first and retries
    # the second six times over, 60 s each (a hub that accepts and never answers held
    # `bitserve pull` forever, then six minutes)
    answer_timeout_s: float = 60.0
    # seconds over which a download must average MIN_TRANSFER_RATE_BPS, else it stops
    # (BITSERVE_PULL_STALL_S; None: never): huggingface_hub's read timeout ends only a
    # silent transfer, and one byte every few seconds ran for ever
    stall_s: float | None = 60.0

    @classmethod
    def from_env(cls, offline: bool = False) -> HubOptions:
        """Options from the environment as it is now (``huggingface_hub`` reads it once,
        at import): ``HF_ENDPOINT``, ``HF_HUB_CACHE``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``,
        and bitserve's ``BITSERVE_PULL_STALL_S`` (a :class:`PullError` if not seconds)."""
        cache = os.environ.get("HF_HUB_CACHE")
        return cls(
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            cache_dir=Path(cache) if cache else None,
            token=os.environ.get("HF_TOKEN") or None,
            offline=offline or _env_flag("HF_HUB_OFFLINE"),
            stall_s=_stall_s_from_env(),
        )

    @property
    def endpoint_url(self) -> str:
        return (self.endpoint or constants.ENDPOINT).rstrip("/")

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir or constants.HF_HUB_CACHE)

    def has_token(self) -> bool:
        if isinstance(self.token, bool):
            return self.token
        return bool(self.token or get_token())


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """A file of a repository at a commit, as the hub lists it."""

    filename: str
    commit: str
    size: int | None
    sha256: str | None  # from the LFS metadata; None for a file kept in git itself


class Puller:
    """Pulls specs into ``options.cache`` and records them in ``registry``; ``notify``
    receives progress sentences (the command line prints them on stderr)."""

    def __init__(
        self,
        options: HubOptions,
        registry: Registry,
        notify: Callable[[str], None] = lambda _msg: None,
    ) -> None:
        self.options = options
        self.registry = registry
        self.notify = notify
        log_hub_once()

    # -- the three ways in -------------------------------------------------------------

    def pull(self, spec: ModelSpec) -> ModelRecord:
        """Download (or revalidate) ``spec``'s file and verify it. Offline: the local copy.
        A file this bitserve cannot run (an architecture or tensor type it lacks) is kept
        and recorded, then :class:`UnrunnableModelError` raised: it is the hub's file,
        verified, and a bitserve that runs it (or another tool) needs no new download."""
        try:
            record = self._pull(spec)
        except (VerificationError, UnreadableModelError, OversizeTransferError):
            record_now = self.registry.get(spec.name)
            if record_now is not None and not record_now.exists():  # its file was just deleted
                self.registry.remove(spec.name)
            raise
        problem = unrunnable_problem(record.path)
        if problem is not None:
            raise UnrunnableModelError(
                f"{record.repo}/{record.filename}", record.name, format_size(record.size), problem
            )
        return record

    def _pull(self, spec: ModelSpec) -> ModelRecord:
        if self.options.offline:
            return self._local_or_raise(spec, "offline mode (--offline or HF_HUB_OFFLINE=1)")
        try:
            remote = self._remote_file(spec)
        except NoNetworkError:
            local = self.local(spec)
            if local is None:
                raise
            self.notify(f"the hub is unreachable; using the copy of {spec.name} on disk")
            return local
        return self._fetch(spec, remote)

    def ensure(self, spec: ModelSpec) -> ModelRecord:
        """A verified local copy without touching the network, else :meth:`pull`."""
        record = self.registry.get(spec.name)
        if record is not None and record.verified and record.exists():
            return record
        return self.pull(spec)

    def local(self, spec: ModelSpec) -> ModelRecord | None:
        """The copy on disk, without the network: recorded and verified, else found in the
        Hugging Face cache and verified against its blob name (the file's sha256; a copy
        that fails is deleted and :class:`VerificationError` raised); else None."""
        record = self.registry.get(spec.name)
        if record is not None and record.exists() and (record.verified or not record.sha256):
            return record
        found = self._find_in_cache(spec)
        if found is None:
            return None
        path, commit, filename = found
        blob = Path(os.path.realpath(path)).name
        sha256 = blob if SHA256.fullmatch(blob) else None
        remote = RemoteFile(filename, commit, os.path.getsize(path), sha256)
        if sha256 is not None:
            problem = file_problem(path, remote.size, sha256)
            if problem is not None:
                remove_cached_file(path)
                raise VerificationError(filename, problem)
        return self._record(spec, remote, path)

    # -- remote ------------------------------------------------------------------------

    def remote_files(self, spec: ModelSpec) -> list[RemoteFile]:
        """Every file of ``spec``'s repository at its revision, with size and LFS sha256."""
        endpoint = self.options.endpoint_url
        api = HfApi(endpoint=endpoint, token=self.options.token)
        guard_session()
        try:
            with bounded_listing(self.options.answer_timeout_s):
                info = api.model_info(
                    spec.repo,
                    revision=spec.revision,
                    files_metadata=True,
                    timeout=self.options.answer_timeout_s,
                )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # HfApi parses the answer itself: not JSON, or JSON of another shape
            raise BadAnswerError(endpoint, spec.repo, _reason(exc)) from None
        except Exception as exc:
            raise self._translate(exc, spec) from None
        try:
            files, unsafe = _listed_files(info)
        except ValueError as exc:
            raise BadAnswerError(endpoint, spec.repo, str(exc)) from None
        if unsafe:
            shown = ", ".join(_reason(repr(name), 60) for name in unsafe[:3])
            more = f" and {len(unsafe) - 3} more" if len(unsafe) > 3 else ""
            self.notify(
                f"ignoring {len(unsafe)} file(s) of {spec.repo} whose names are not paths "
                f"inside the repository: {shown}{more}"
            )
        return files

    def _remote_file(self, spec: ModelSpec) -> RemoteFile:
        files = {f.filename: f for f in self.remote_files(spec)}
        remote = files[spec.choose(files)]
        filename = remote.filename
        if spec.sha256 is not None and remote.sha256 != spec.sha256:
            raise PullError(
                f"the hub lists sha256 {remote.sha256} for {spec.repo}/{filename}, but "
                f"bitserve's catalog pins {spec.sha256}; refusing to download it"
            )
        return remote

    def _fetch(self, spec: ModelSpec, remote: RemoteFile) -> ModelRecord:
        cached = self._cached_path(spec.repo, remote)
        if cached is not None:
            record = self.registry.get(spec.name)
            if record is not None and _same_file(record, cached, remote) and record.verified:
                return record
        path = self.fetch_file(spec, remote)
        return self._record(spec, remote, path)

    def fetch_file(self, spec: ModelSpec, remote: RemoteFile) -> str:
        """The path of ``remote`` in the cache, downloaded unless a copy that passes
        verification is there; a copy or download that fails it is deleted."""
        cached = self._cached_path(spec.repo, remote)
        if cached is not None:
            problem = file_problem(cached, remote.size, remote.sha256)
            if problem is None:
                return cached
            remove_cached_file(cached)
            self.notify(f"the copy of {remote.filename} on disk was damaged; downloading it again")
        self._check_space(remote.size)
        size = format_size(remote.size) if remote.size is not None else "unknown size"
        if self._clear_partials(spec.repo, remote):
            self.notify(f"downloading {spec.repo}/{remote.filename} ({size})")
        else:
            self.notify(
                f"another process is downloading {spec.repo}/{remote.filename} ({size}); "
                "waiting for it"
            )
        path = self._download(spec, remote)
        problem = file_problem(path, remote.size, remote.sha256)
        if problem is not None:
            remove_cached_file(path)
            raise VerificationError(remote.filename, problem)
        return path

    def _clear_partials(self, repo: str, remote: RemoteFile) -> bool:
        """Delete the partial files of ``remote`` that no download is writing, and say
        whether one is (False: another process holds the file's download lock, and
        ``huggingface_hub`` will wait for it). ``huggingface_hub`` names a partial file per
        process and deletes it on the way out, which a process killed outright (SIGKILL,
        the OOM killer, a power cut) never takes: each such pull left gigabytes for good."""
        if remote.sha256 is None:  # the blob is named by an ETag known only to the download
            return True
        folder = repo_folder_name(repo_id=repo, repo_type="model")
        lock_path = self.options.cache / ".locks" / folder / f"{remote.sha256}.lock"
        lock = FileLock(lock_path, mode=0o664)  # as huggingface_hub makes it: shared caches
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        except (OSError, NotImplementedError):  # no lock there: leave the folder alone
            return True
        try:
            for partial in (self.options.cache / folder / "blobs").glob(
                f"{remote.sha256}*.incomplete"
            ):
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
        finally:
            lock.release()
        return True

    def _download(self, spec: ModelSpec, remote: RemoteFile) -> str:
        guard_session()
        try:
            with (
                stopping_signals_unwind(),
                bounded_metadata_wait(remote.filename, self.options.answer_timeout_s),
                bounded_transfers(remote.filename, remote.size, self.options.stall_s),
            ):
                path = hf_hub_download(
                    spec.repo,
                    remote.filename,
                    revision=remote.commit,
                    cache_dir=self.options.cache,
                    endpoint=self.options.endpoint_url,
                    token=self.options.token,
                )
            return str(path)
        except OSError as exc:
            if m := _SIZE_MISMATCH.match(str(exc)):  # huggingface_hub discarded the file
                expected, actual = m.groups()
                raise VerificationError(
                    remote.filename, f"{actual} bytes arrived, the hub lists {expected}"
                ) from None
            raise self._translate(exc, spec) from None
        except Exception as exc:
            raise self._translate(exc, spec) from None

    def _translate(self, exc: BaseException, spec: ModelSpec) -> PullError:
        """The :class:`PullError` for an exception of ``huggingface_hub`` or the network."""
        cause = exc.__cause__ if isinstance(exc, hf_errors.LocalEntryNotFoundError) else exc
        if isinstance(exc, PullError):
            return exc
        if is_disk_full(exc):
            return DiskFullError(self.options.cache, None, None)
        if isinstance(exc, hf_errors.GatedRepoError):
            return GatedRepoError(spec.repo, self.options.has_token())
        if isinstance(exc, hf_errors.RepositoryNotFoundError):
            return RepoNotFoundError(spec.repo)
        if isinstance(exc, hf_errors.RevisionNotFoundError):
            return RevisionNotFoundError(spec.repo, spec.revision or "main")
        if isinstance(cause, (httpx2.TransportError, hf_errors.OfflineModeIsEnabled)):
            return NoNetworkError(self.options.endpoint_url, _reason(cause))
        if isinstance(exc, hf_errors.HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else "an error"
            return PullError(f"the hub answered HTTP {status} for {spec.repo}; try again later")
        if isinstance(cause, (httpx2.RequestError, hf_errors.FileMetadataError)):
            # a redirect loop, a body that does not decode, headers a hub always sends missing
            return BadAnswerError(self.options.endpoint_url, spec.repo, _reason(cause))
        if isinstance(exc, OSError):
            return PullError(f"cannot write to {self.options.cache}: {exc.strerror or exc}")
        raise exc

    # -- local -------------------------------------------------------------------------

    def _cached_path(self, repo: str, remote: RemoteFile) -> str | None:
        path = try_to_load_from_cache(
            repo, remote.filename, cache_dir=self.options.cache, revision=remote.commit
        )
        return path if isinstance(path, str) and os.path.isfile(path) else None

    def _find_in_cache(self, spec: ModelSpec) -> tuple[str, str, str] | None:
        """``(path, commit, filename)`` of the file ``spec`` names in the cache: in the
        pinned revision's snapshot, else in ``refs/main``'s, else in the newest snapshot
        that has one (bitserve downloads by commit, which leaves ``refs`` alone)."""
        storage = self.options.cache / ("models--" + spec.repo.replace("/", "--"))
        snapshots = storage / "snapshots"
        commits = [spec.revision] if spec.revision else []
        if not commits:
            with contextlib.suppress(OSError):
                commits.append((storage / "refs" / "main").read_text().strip())
            if snapshots.is_dir():
                by_age = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
                commits += [p.name for p in by_age]
        for commit in commits:
            snapshot = snapshots / commit
            if not snapshot.is_dir():
                continue
            files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
            try:
                filename = spec.choose(files)
            except PullError:
                continue
            return str(snapshot / filename), commit, filename
        return None

    def _local_or_raise(self, spec: ModelSpec, why: str) -> ModelRecord:
        record = self.local(spec)
        if record is None:
            raise NotCachedError(spec.name, f"{why} forbids downloading it")
        return record

    def _check_space(self, size: int | None) -> None:
        if size is None:
            return
        directory = self.options.cache
        probe = directory
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if size > free:
            raise DiskFullError(directory, size, free)

    def _record(self, spec: ModelSpec, remote: RemoteFile, path: str) -> ModelRecord:
        """Record ``path``, which was just checked against ``remote`` (verified if the hub
        gave its sha256), once it reads as a GGUF file: one that does not is deleted, never
        recorded (``serve -hf`` would take it for a model). One of a tensor type bitserve
        lacks is a GGUF file all the same: recorded (:meth:`pull` says it cannot run)."""
        from bitserve.gguf import GGUFError

        try:
            arch = _architecture(path)
        except GGUFError as exc:
            if not exc.unsupported:
                remove_cached_file(path)
                raise UnreadableModelError(f"{spec.repo}/{remote.filename}", exc.problem) from None
            arch = None
        record = ModelRecord(
            name=spec.name,
            repo=spec.repo,
            filename=remote.filename,
            revision=remote.commit,
            path=os.path.abspath(path),
            size=os.path.getsize(path),
            sha256=remote.sha256,
            family=spec.family or arch,
            verified_at=None,
        ).with_verification(remote.sha256 is not None)
        self.registry.put(record)
        return record


def _listed_files(info: Any) -> tuple[list[RemoteFile], list[str]]:
    """The files of a model info from the hub, and the names left out because they are
    not paths inside the repository (``../x``, ``/x``, control characters...: written as
    given, they would land outside the cache, or garble the sentences that name them).
    Raises ``ValueError`` naming the first field that is not what the hub sends."""
    commit = info.sha
    if not isinstance(commit, str) or not COMMIT.fullmatch(commit):
        raise ValueError(f"commit id {_reason(repr(commit), 60)}")
    files: list[RemoteFile] = []
    unsafe: list[str] = []
    for sibling in info.siblings or []:
        name = sibling.rfilename
        if not isinstance(name, str):
            raise ValueError(f"file name {_reason(repr(name), 60)}")
        lfs = sibling.lfs
        size, sha256 = (lfs.size, lfs.sha256) if lfs is not None else (sibling.size, None)
        if size is not None and (type(size) is not int or size < 0):
            raise ValueError(f"size {_reason(repr(size), 60)} of {_reason(repr(name), 60)}")
        if sha256 is not None and not (isinstance(sha256, str) and SHA256.fullmatch(sha256)):
            raise ValueError(f"sha256 {_reason(repr(sha256), 80)} of {_reason(repr(name), 60)}")
        if not is_safe_filename(name):
            unsafe.append(name)
            continue
        files.append(RemoteFile(name, commit, size, sha256))
    return files, unsafe


def is_safe_filename(name: str) -> bool:
    """True for a relative path of plain components, each short enough for a file system:
    what a file of a repository is, and all that may be written under the cache (or
    printed: no control, format or bidirectional characters, no lone surrogates)."""
    if "\\" in name or any(unicodedata.category(c) in _UNPRINTABLE for c in name):
        return False
    return not any(part in ("", ".", "..") or len(part.encode()) > 255 for part in name.split("/"))


def file_problem(path: str, size: int | None, sha256: str | None) -> str | None:
    """Why ``path`` is not the file of ``size`` bytes and ``sha256``; None if it is."""
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        return f"{actual} bytes on disk, the hub lists {size}"
    if sha256 is not None:
        digest = sha256_file(path)
        if digest != sha256:
            return f"sha256 {digest}, the hub lists {sha256}"
    return None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def remove_cached_file(path: str) -> None:
    """Delete a file of the Hugging Face cache: its blob and every snapshot link to it.
    A path laid out otherwise is a :class:`PullError`, nothing deleted: the path may come
    from models.json, which a hand edit (or another tool) can point at any file."""
    blob = os.path.realpath(path)
    storage = _cache_storage(path)
    if storage is None:
        raise PullError(
            f"{path} is not a file of a Hugging Face cache (models--OWNER--NAME/snapshots/...); "
            "bitserve deletes nothing else"
        )
    snapshots = storage / "snapshots"
    if snapshots.is_dir():
        for link in snapshots.rglob("*"):
            if link.is_symlink() and os.path.realpath(link) == blob:
                link.unlink()
    for victim in (path, blob):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(victim)


def _cache_storage(path: str) -> Path | None:
    """The ``models--owner--name`` folder whose snapshot ``path`` is, if it is one and
    resolves to that folder's blobs (or, where the cache copies, to itself)."""
    link = Path(os.path.abspath(path))
    blob = Path(os.path.realpath(path))
    for storage in link.parents:
        if storage.name.startswith("models--") and link.is_relative_to(storage / "snapshots"):
            inside = blob.parent == Path(os.path.realpath(storage / "blobs")) or blob == link
            return storage if inside else None
    return None


def _same_file(record: ModelRecord, path: str, remote: RemoteFile) -> bool:
    return (
        os.path.realpath(record.path) == os.path.realpath(path)
        and record.sha256 == remote.sha256
        and record.size == remote.size
    )


def _architecture(path: str) -> str | None:
    """``general.architecture`` of a GGUF file (None if it names none); ``GGUFError`` if
    it is not a GGUF file bitserve reads (not one at all, truncated, a type it lacks)."""
    from bitserve.gguf import read_gguf

    gguf = read_gguf(path)
    try:
        arch: Any = gguf.get("general.architecture")
        return str(arch) if arch is not None else None
    finally:
        gguf.close()


def unrunnable_problem(path: str) -> str | None:
    """Why this bitserve cannot run the GGUF file ``path`` (a tensor type or an
    architecture it lacks), read from its header; None if it is of a kind it runs."""
    from bitserve.gguf import GGUFError
    from bitserve.model.arch import SUPPORTED_ARCHITECTURES

    try:
        arch = _architecture(path)
    except GGUFError as exc:
        return exc.problem
    if arch not in SUPPORTED_ARCHITECTURES:
        return f"architecture {arch!r}; it runs {', '.join(SUPPORTED_ARCHITECTURES)}"
    return None


def _reason(exc: BaseException | str, limit: int = 120) -> str:
    text = (str(exc).strip() or type(exc).__name__) if isinstance(exc, BaseException) else exc
    return text if len(text) <= limit else text[: limit - 3] + "..."
