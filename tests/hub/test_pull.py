"""Pulls through the real ``huggingface_hub`` client against the fake hub on 127.0.0.1:
download, resume, verification, revalidation, offline use and every error sentence."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from fake_hub import FakeHub, HubFile, HubRepo
from hub_helpers import BITNET_REPO, HubClient, bitnet_repo, gguf_bytes
from huggingface_hub import constants as hf_constants

from bitserve.hub import Catalog, CatalogEntry, Puller, resolve
from bitserve.hub.errors import (
    DiskFullError,
    GatedRepoError,
    HubSilentError,
    NoMatchingFileError,
    NoNetworkError,
    NotCachedError,
    OversizeTransferError,
    PullError,
    RepoNotFoundError,
    VerificationError,
    is_disk_full,
)
from bitserve.hub.pull import sha256_file


def blobs(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("blobs/*") if p.is_file()]


def test_pull_by_catalog_name_downloads_verifies_and_records(
    hub: FakeHub, client: HubClient
) -> None:
    content = gguf_bytes(300_000)
    hub.repos[BITNET_REPO] = bitnet_repo(content)
    record = client.pull("bitnet-2b")
    assert Path(record.path).read_bytes() == content
    assert record.sha256 == sha256_file(record.path) and record.verified
    assert (record.name, record.repo, record.filename) == (
        "bitnet-2b",
        BITNET_REPO,
        "ggml-model-i2_s.gguf",
    )
    assert record.family == "bitnet" and record.revision == hub.repos[BITNET_REPO].commit
    # the Hugging Face cache layout: snapshots/<commit>/file -> blobs/<sha256>
    assert f"models--microsoft--bitnet-b1.58-2B-4T-gguf/snapshots/{record.revision}" in record.path
    assert Path(os.path.realpath(record.path)).name == record.sha256
    assert client.registry.get("bitnet-2b") == record
    assert any("downloading" in m for m in client.messages)
    # the model info was asked for with the files' LFS metadata
    assert hub.requests("hub", "GET")[0].path == f"/api/models/{BITNET_REPO}"


def test_pull_by_repo_variant_takes_the_file_named_by_the_variant(
    hub: FakeHub, client: HubClient
) -> None:
    files = {
        name: HubFile(gguf_bytes(2000))
        for name in ("Ternary-Bonsai-8B-Q2_0.gguf", "Ternary-Bonsai-8B-Q2_0_g64.gguf")
    }
    files["Ternary-Bonsai-8B-F16.gguf"] = HubFile(gguf_bytes(4000))
    hub.repos["prism-ml/Ternary-Bonsai-8B-gguf"] = HubRepo(files)
    record = client.pull("prism-ml/Ternary-Bonsai-8B-gguf:Q2_0_g64")
    assert record.filename == "Ternary-Bonsai-8B-Q2_0_g64.gguf"
    assert record.name == "prism-ml/Ternary-Bonsai-8B-gguf:Q2_0_g64"
    record = client.pull("prism-ml/Ternary-Bonsai-8B-gguf:q2_0")  # case-insensitive, exact end
    assert record.filename == "Ternary-Bonsai-8B-Q2_0.gguf"
    # without a variant: the best ternary kind bitserve runs, never the F16 file
    assert client.pull("prism-ml/Ternary-Bonsai-8B-gguf").filename.endswith("Q2_0_g64.gguf")


def test_interrupted_download_resumes_where_it_stopped(hub: FakeHub, client: HubClient) -> None:
    # huggingface_hub writes whole chunks (10 MiB): cut the transfer inside the second one
    chunk = hf_constants.DOWNLOAD_CHUNK_SIZE
    content = gguf_bytes(chunk + chunk // 2)
    repo = bitnet_repo(content)
    repo.files["ggml-model-i2_s.gguf"].drop_after = chunk + chunk // 4
    hub.repos[BITNET_REPO] = repo
    record = client.pull("bitnet-2b")
    assert Path(record.path).read_bytes() == content and record.verified
    first, second = hub.blob_gets()
    assert first.range is None and first.sent == chunk + chunk // 4  # the connection dropped
    assert second.range == f"bytes={chunk}-" and second.status == 206
    assert second.sent == len(content) - chunk  # the rest only, not the whole file again


def test_a_corrupted_byte_is_caught_and_the_file_deleted(hub: FakeHub, client: HubClient) -> None:
    content = gguf_bytes(100_000)
    repo = bitnet_repo(content)
    damaged = bytearray(content)
    damaged[54_321] ^= 0x10
    repo.files["ggml-model-i2_s.gguf"].served = bytes(damaged)
    hub.repos[BITNET_REPO] = repo
    with pytest.raises(VerificationError) as caught:
        client.pull("bitnet-2b")
    message = str(caught.value)
    assert message.startswith("ggml-model-i2_s.gguf failed verification (sha256 ")
    assert repo.files["ggml-model-i2_s.gguf"].sha256 in message
    assert "the file was deleted" in message
    assert blobs(client.options.cache) == []
    assert not list(client.options.cache.rglob("snapshots/*/*.gguf"))
    assert client.registry.get("bitnet-2b") is None
    # once the hub serves the right bytes, the same command succeeds
    repo.files["ggml-model-i2_s.gguf"].served = None
    assert Path(client.pull("bitnet-2b").path).read_bytes() == content


def test_a_damaged_copy_on_disk_is_replaced(hub: FakeHub, client: HubClient) -> None:
    content = gguf_bytes(50_000)
    hub.repos[BITNET_REPO] = bitnet_repo(content)
    record = client.pull("bitnet-2b")
    blob = Path(os.path.realpath(record.path))
    blob.write_bytes(b"\0" * len(content))  # a truncated-then-zero-filled download
    client.registry.put(record.with_verification(False))
    again = client.pull("bitnet-2b")
    assert Path(again.path).read_bytes() == content and again.verified
    assert len(hub.blob_gets()) == 2
    assert any("damaged" in m for m in client.messages)


def test_pulling_again_revalidates_without_downloading(hub: FakeHub, client: HubClient) -> None:
    hub.repos[BITNET_REPO] = bitnet_repo(gguf_bytes(20_000))
    first = client.pull("bitnet-2b")
    hub.clear_log()
    assert client.pull("bitnet-2b") == first
    assert [r.path for r in hub.requests()] == [f"/api/models/{BITNET_REPO}"]


def test_a_new_commit_on_the_hub_is_downloaded(hub: FakeHub, client: HubClient) -> None:
    repo = bitnet_repo(gguf_bytes(20_000))
    hub.repos[BITNET_REPO] = repo
    first = client.pull("bitnet-2b")
    newer = gguf_bytes(21_000)
    repo.files["ggml-model-i2_s.gguf"] = HubFile(newer)
    repo.new_commit()
    second = client.pull("bitnet-2b")
    assert second.revision == repo.commit != first.revision
    assert Path(second.path).read_bytes() == newer
    assert client.registry.get("bitnet-2b") == second


def test_offline_uses_the_downloaded_copy_and_never_the_network(
    hub: FakeHub, client: HubClient
) -> None:
    content = gguf_bytes(10_000)
    hub.repos[BITNET_REPO] = bitnet_repo(content)
    record = client.pull("bitnet-2b")
    hub.stop()
    hub.clear_log()
    assert client.pull("bitnet-2b", offline=True) == record
    # also without bitserve's registry: found in the Hugging Face cache, checked against
    # its blob name (the LFS sha256)
    client.registry.path.unlink()
    client.registry.remove("bitnet-2b")
    found = client.pull("bitnet-2b", offline=True)
    assert Path(found.path).read_bytes() == content and found.verified
    assert hub.log == []


def test_offline_without_a_downloaded_copy_says_so(hub: FakeHub, client: HubClient) -> None:
    hub.repos[BITNET_REPO] = bitnet_repo(b"x" * 100)
    with pytest.raises(NotCachedError) as caught:
        client.pull("bitnet-2b", offline=True)
    assert str(caught.value) == (
        "bitnet-2b is not downloaded and offline mode (--offline or HF_HUB_OFFLINE=1) forbids "
        "downloading it; run `bitserve pull bitnet-2b` while online"
    )
    assert hub.log == []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_no_network_is_one_sentence(client: HubClient) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(NoNetworkError) as caught:
        client.pull("bitnet-2b", endpoint=endpoint)
    message = str(caught.value)
    assert message.startswith(f"cannot reach the model hub at {endpoint} (")
    assert message.endswith(
        "check the network or proxy, or pass --offline to use only models already downloaded"
    )


def test_no_network_falls_back_to_the_downloaded_copy(hub: FakeHub, client: HubClient) -> None:
    hub.repos[BITNET_REPO] = bitnet_repo(gguf_bytes(5000))
    record = client.pull("bitnet-2b")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    assert client.pull("bitnet-2b", endpoint=endpoint) == record
    assert client.messages[-1] == "the hub is unreachable; using the copy of bitnet-2b on disk"


def test_a_hub_that_never_answers_the_listing_times_out(hub: FakeHub, client: HubClient) -> None:
    """huggingface_hub lists a repository with no timeout: a hub that accepted the
    connection and never answered held `bitserve pull` (and `serve -hf`) forever."""
    hub.repos[BITNET_REPO] = bitnet_repo(gguf_bytes(5000))
    record = client.pull("bitnet-2b")
    hub.repos[BITNET_REPO].info_stalls = True
    hub.repos["a/b"] = HubRepo({"m-i2_s.gguf": HubFile(gguf_bytes(1000))}, info_stalls=True)
    assert client.pull("bitnet-2b", answer_timeout_s=0.2) == record
    assert client.messages[-1] == "the hub is unreachable; using the copy of bitnet-2b on disk"
    with pytest.raises(NoNetworkError, match=r"cannot reach the model hub at .* \(timed out\)"):
        client.pull("a/b", answer_timeout_s=0.2)


@pytest.mark.timeout(60)  # before the fix: a byte every 0.2 s, for ever
def test_a_listing_sent_a_byte_at_a_time_times_out(hub: FakeHub, client: HubClient) -> None:
    """The listing's read timeout bounds each read: a hub (or proxy) sending a byte every
    few seconds never reached it, and held `bitserve pull` for ever."""
    hub.repos["a/b"] = HubRepo({"m-i2_s.gguf": HubFile(gguf_bytes(1000))}, info_trickle_s=0.2)
    started = time.monotonic()
    with pytest.raises(NoNetworkError, match=r"cannot reach the model hub at .* \(timed out\)"):
        client.pull("a/b", answer_timeout_s=1.0)
    assert time.monotonic() - started < 15


@pytest.mark.timeout(60)  # before the fix: six HEAD requests of 60 s each
def test_a_hub_that_never_answers_a_files_metadata_times_out(
    hub: FakeHub, client: HubClient
) -> None:
    """huggingface_hub asks for a file's metadata (HEAD) once with a 10 s timeout, then six
    times more with 60 s each: `bitserve pull` sat silent for six minutes."""
    hub.repos["a/b"] = HubRepo({"m-i2_s.gguf": HubFile(gguf_bytes(1000), resolve_stalls=True)})
    started = time.monotonic()
    with pytest.raises(HubSilentError) as caught:
        client.pull("a/b", answer_timeout_s=1.0)
    assert time.monotonic() - started < 15  # 1 s, and one of huggingface_hub's backoffs
    assert str(caught.value) == (
        "the hub at 127.0.0.1 has not answered about m-i2_s.gguf for 1 s, retries included; "
        "nothing was downloaded: try again later, or check the network or proxy"
    )
    assert hub.blob_gets() == [] and blobs(client.options.cache) == []


def test_unknown_repo_is_one_sentence(client: HubClient) -> None:
    with pytest.raises(RepoNotFoundError) as caught:
        client.pull("nobody/no-such-model")
    assert str(caught.value) == (
        "no repository 'nobody/no-such-model' on the hub (or it is private and HF_TOKEN does "
        "not grant access); check the spelling, or run `bitserve pull --list` for the catalog"
    )


def test_gated_repo_needs_a_token(hub: FakeHub, client: HubClient) -> None:
    content = gguf_bytes(3000)
    hub.repos["meta/gated-1.58"] = HubRepo({"model-i2_s.gguf": HubFile(content)}, gated=True)
    with pytest.raises(GatedRepoError) as caught:
        client.pull("meta/gated-1.58")
    assert str(caught.value) == (
        "meta/gated-1.58 is a gated repository and no HF_TOKEN is set: accept its licence on "
        "its hub page, then set HF_TOKEN to an access token of that account"
    )
    with pytest.raises(GatedRepoError) as caught:
        client.pull("meta/gated-1.58", token="hf_wrong")
    assert "your HF_TOKEN has not been granted access to it" in str(caught.value)
    record = client.pull("meta/gated-1.58", token=hub.token)
    assert Path(record.path).read_bytes() == content
    assert hub.blob_gets()[-1].authorization is None  # the token never goes to the CDN


def test_no_matching_file_lists_the_candidates(hub: FakeHub, client: HubClient) -> None:
    hub.repos["tiiuae/Falcon3-3B-Instruct-GGUF"] = HubRepo(
        {
            "Falcon3-3B-Instruct-f16.gguf": HubFile(b"a" * 10),
            "Falcon3-3B-Instruct-q4_k_m.gguf": HubFile(b"b" * 10),
            "README.md": HubFile(b"c", lfs=False),
        }
    )
    with pytest.raises(NoMatchingFileError) as caught:
        client.pull("tiiuae/Falcon3-3B-Instruct-GGUF")
    assert str(caught.value) == (
        "tiiuae/Falcon3-3B-Instruct-GGUF has no ternary GGUF file bitserve can run (I2_S, "
        "TQ2_0, TQ1_0 or Q2_0); its GGUF files: Falcon3-3B-Instruct-f16.gguf, "
        "Falcon3-3B-Instruct-q4_k_m.gguf"
    )
    with pytest.raises(NoMatchingFileError, match="has no GGUF file of variant 'Q2_0'"):
        client.pull("tiiuae/Falcon3-3B-Instruct-GGUF:Q2_0")


def test_disk_full_is_caught_before_downloading(hub: FakeHub, client: HubClient) -> None:
    repo = bitnet_repo(gguf_bytes(1000))
    repo.files["ggml-model-i2_s.gguf"].listed_size = 10**15  # a petabyte: no disk has it
    hub.repos[BITNET_REPO] = repo
    with pytest.raises(DiskFullError) as caught:
        client.pull("bitnet-2b")
    message = str(caught.value)
    assert message.startswith(f"not enough disk space in {client.options.cache} (1000.00 TB needed")
    assert message.endswith("free some space, or set HF_HUB_CACHE to a folder on a larger disk")
    assert hub.blob_gets() == []


def test_disk_full_while_writing_is_recognised(client: HubClient) -> None:
    # the kernel's own ENOSPC, as a download that fills the disk gets it
    with pytest.raises(OSError) as caught, open("/dev/full", "wb", buffering=0) as full:
        full.write(b"weights")
    assert is_disk_full(caught.value)
    error = client.puller()._translate(caught.value, resolve("bitnet-2b", Catalog.load()))
    assert str(error) == (
        f"not enough disk space in {client.options.cache}; free some space, or set "
        "HF_HUB_CACHE to a folder on a larger disk"
    )


def test_a_catalog_pin_that_the_hub_contradicts_is_refused(hub: FakeHub, client: HubClient) -> None:
    repo = bitnet_repo(gguf_bytes(1000))
    hub.repos[BITNET_REPO] = repo
    pinned = CatalogEntry(
        name="pinned",
        repo=BITNET_REPO,
        file="ggml-model-i2_s.gguf",
        family="bitnet",
        arch="bitnet-b1.58",
        description="",
        licence="MIT",
        checked="test",
        revision=repo.commit,
        sha256="0" * 64,
    )
    with pytest.raises(PullError, match="catalog pins 0000"):
        client.puller().pull(resolve("pinned", Catalog([pinned])))
    assert hub.blob_gets() == []


def test_ensure_serves_a_verified_copy_without_the_network(hub: FakeHub, client: HubClient) -> None:
    hub.repos[BITNET_REPO] = bitnet_repo(gguf_bytes(5000))
    spec = resolve("bitnet-2b", Catalog.load())
    first = client.puller().ensure(spec)  # downloads
    hub.stop()
    hub.clear_log()
    puller: Puller = client.puller()
    assert puller.ensure(spec) == first
    assert hub.log == []


def test_offline_never_serves_a_copy_that_failed_verification(
    hub: FakeHub, client: HubClient
) -> None:
    content = gguf_bytes(20_000)
    hub.repos[BITNET_REPO] = bitnet_repo(content)
    record = client.pull("bitnet-2b")
    blob = Path(os.path.realpath(record.path))
    blob.write_bytes(content[:-1] + bytes([content[-1] ^ 0xFF]))  # damaged after the pull
    client.registry.put(record.with_verification(False))  # as `bitserve models --verify` does
    with pytest.raises(VerificationError, match="the file was deleted"):
        client.pull("bitnet-2b", offline=True)
    assert not blob.exists() and client.registry.get("bitnet-2b") is None
    with pytest.raises(NotCachedError):
        client.pull("bitnet-2b", offline=True)


@pytest.mark.parametrize("served", [40_000, 90_000], ids=["short", "long"])
def test_a_download_of_another_size_is_never_kept(
    hub: FakeHub, client: HubClient, served: int
) -> None:
    # huggingface_hub#4223: a transfer that ends early but cleanly (a short body with a
    # matching Content-Length) once left a truncated file that loaded as zeros. A longer
    # body is cut at the listed size.
    content = gguf_bytes(60_000)
    repo = bitnet_repo(content)
    repo.files["ggml-model-i2_s.gguf"].served = (content + content)[:served]
    hub.repos[BITNET_REPO] = repo
    with pytest.raises(PullError) as caught:
        client.pull("bitnet-2b")
    if served < len(content):
        assert str(caught.value) == (
            f"ggml-model-i2_s.gguf failed verification ({served} bytes arrived, the hub lists "
            "60000); the file was deleted: run the same command again to download it anew"
        )
    else:
        assert isinstance(caught.value, OversizeTransferError)
    assert blobs(client.options.cache) == [] and client.registry.get("bitnet-2b") is None
