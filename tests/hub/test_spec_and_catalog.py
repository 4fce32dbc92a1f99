"""The catalog shipped with bitserve, and how a name becomes a repository and one file."""

from __future__ import annotations

import pytest

from bitserve.hub import Catalog, resolve
from bitserve.hub.catalog import CatalogError
from bitserve.hub.errors import AmbiguousFileError, NoMatchingFileError, PullError
from bitserve.hub.spec import ModelSpec, file_kind


def test_the_shipped_catalog_is_well_formed() -> None:
    catalog = Catalog.load()
    names = {e.name for e in catalog}
    families = {e.family for e in catalog}
    assert {"bitnet-2b", "falcon3-1b", "falcon3-3b", "falcon3-7b", "falcon-e-3b"} <= names
    assert {"bonsai-8b", "bonsai-4b", "bonsai-1.7b", "llama3-8b-1.58"} <= names
    assert {"bitnet", "falcon3", "falcon-e", "bonsai", "llama3-1.58"} == families
    for entry in catalog:
        # every file is a ternary kind the server runs, and every fact says how it was checked
        assert file_kind(entry.file.replace("*", "Model")) is not None, entry.name
        assert entry.checked and entry.licence
        assert catalog.get(entry.name.upper()) is entry  # names are case-insensitive
    assert catalog.get("bitnet-b1.58-2b-4t") is catalog.get("bitnet-2b")


def test_malformed_catalog_entries_are_refused() -> None:
    good = {
        "name": "x",
        "repo": "o/r",
        "file": "m-i2_s.gguf",
        "family": "bitnet",
        "arch": "bitnet-b1.58",
        "description": "",
        "licence": "MIT",
        "checked": "test",
    }
    Catalog.from_json({"version": 1, "models": [good]})
    for bad, problem in [
        ({"repo": "no-owner"}, "not owner/name"),
        ({"file": "m.bin"}, "not a .gguf pattern"),
        ({"sha256": "ab" * 32}, "needs a pinned revision"),
        ({"revision": "main"}, "not a 40-digit commit"),
        ({"colour": "red"}, "unknown keys"),
    ]:
        with pytest.raises(CatalogError, match=problem):
            Catalog.from_json({"version": 1, "models": [{**good, **bad}]})
    with pytest.raises(CatalogError, match="used twice"):
        Catalog.from_json({"version": 1, "models": [good, {**good, "repo": "o/s"}]})


def test_names_resolve_to_catalog_entries_repos_and_variants() -> None:
    catalog = Catalog.load()
    spec = resolve("bitnet-2b", catalog)
    assert (spec.repo, spec.pattern, spec.family) == (
        "microsoft/bitnet-b1.58-2B-4T-gguf",
        "ggml-model-i2_s.gguf",
        "bitnet",
    )
    spec = resolve("prism-ml/Ternary-Bonsai-8B-gguf:Q2_0_g64", catalog)
    assert (spec.name, spec.repo, spec.variant, spec.pattern) == (
        "prism-ml/Ternary-Bonsai-8B-gguf:Q2_0_g64",
        "prism-ml/Ternary-Bonsai-8B-gguf",
        "Q2_0_g64",
        None,
    )
    assert resolve("tiiuae/Falcon3-3B-Instruct-1.58bit-GGUF", catalog).variant is None
    for bad in ("no-such-model", "owner/repo:", "/repo", "a/b/c", "a/..", "a/.x", "a--b/c"):
        with pytest.raises(PullError, match="neither a catalog name nor a repository"):
            resolve(bad, catalog)


def test_a_bare_repo_gets_the_best_ternary_file() -> None:
    spec = ModelSpec(name="o/r", repo="o/r")
    files = ["m-f16.gguf", "m-TQ1_0.gguf", "m-TQ2_0.gguf", "README.md", "m-q4_k_m.gguf"]
    assert spec.choose(files) == "m-TQ2_0.gguf"
    assert spec.choose([*files, "ggml-model-i2_s.gguf"]) == "ggml-model-i2_s.gguf"
    with pytest.raises(AmbiguousFileError) as caught:
        spec.choose(["a-i2_s.gguf", "b-i2_s.gguf"])
    assert str(caught.value) == (
        "o/r has several files that match: a-i2_s.gguf, b-i2_s.gguf; name one as "
        "o/r:VARIANT (e.g. o/r:i2_s)"
    )
    with pytest.raises(NoMatchingFileError, match="its GGUF files: none"):
        spec.choose(["model.safetensors", "config.json"])


def test_a_variant_prefers_the_file_it_ends() -> None:
    files = ["B-8B-Q2_0.gguf", "B-8B-Q2_0_g64.gguf", "B-8B-TQ2_0-Q4out.gguf"]
    assert ModelSpec("n", "o/r", variant="Q2_0").choose(files) == "B-8B-Q2_0.gguf"
    assert ModelSpec("n", "o/r", variant="q2_0_G64").choose(files) == "B-8B-Q2_0_g64.gguf"
    # not at the end, but between separators
    assert ModelSpec("n", "o/r", variant="TQ2_0").choose(files) == "B-8B-TQ2_0-Q4out.gguf"
    assert ModelSpec("n", "o/r", pattern="*-Q2_0_g64.gguf").choose(files) == "B-8B-Q2_0_g64.gguf"


def test_a_catalog_repository_pulled_by_its_id_keeps_the_catalog_family() -> None:
    """`bitserve models` listed one Falcon3 file as family 'falcon3' (pulled as
    falcon3-3b) and 'llama' (pulled by its repository id); a repository the catalog does
    not know is still named by its file's architecture at pull time."""
    catalog = Catalog.load()
    assert resolve("tiiuae/Falcon3-3B-Instruct-1.58bit-GGUF", catalog).family == "falcon3"
    assert resolve("prism-ml/Ternary-Bonsai-8B-gguf:Q2_0_g64", catalog).family == "bonsai"
    assert resolve("someone/else-GGUF", catalog).family is None
