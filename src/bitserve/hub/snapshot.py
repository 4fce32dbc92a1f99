"""A repository's checkpoint files (config, tokenizer, safetensors) in the Hugging Face
cache, for ``bitserve convert``: each downloaded (or found) and verified like a pull."""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

from bitserve.hub.errors import NotCachedError, PullError
from bitserve.hub.pull import Puller
from bitserve.hub.spec import ModelSpec

CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
    "*.safetensors",
)


def _wanted(filename: str) -> bool:
    return "/" not in filename and any(fnmatchcase(filename, p) for p in CHECKPOINT_FILES)


def fetch_checkpoint(puller: Puller, repo: str, revision: str | None = None) -> Path:
    """The snapshot folder holding ``repo``'s checkpoint files at ``revision`` (main)."""
    spec = ModelSpec(name=repo, repo=repo, revision=revision)
    if puller.options.offline:
        folder = cached_checkpoint(puller.options.cache, repo, revision)
        if folder is None:
            raise NotCachedError(
                repo, "offline mode forbids downloading it", f"convert {repo} OUT.gguf"
            )
        return folder
    listed = puller.remote_files(spec)
    files = [f for f in listed if _wanted(f.filename)]
    names = {f.filename for f in files}
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise PullError(
            f"{repo} is not a safetensors checkpoint (config.json and *.safetensors); "
            f"its files: {', '.join(sorted(f.filename for f in listed)) or 'none'}"
        )
    paths = [puller.fetch_file(spec, f) for f in files]
    return Path(paths[0]).parent


def cached_checkpoint(cache: Path, repo: str, revision: str | None) -> Path | None:
    """The newest cached snapshot of ``repo`` (or the one of ``revision``) that has a
    config.json and safetensors; None if there is none."""
    snapshots = cache / ("models--" + repo.replace("/", "--")) / "snapshots"
    if not snapshots.is_dir():
        return None
    folders = [snapshots / revision] if revision else list(snapshots.iterdir())
    folders.sort(key=lambda p: p.stat().st_mtime if p.exists() else 0, reverse=True)
    for folder in folders:
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return folder
    return None
