"""``bitserve convert owner/repo out.gguf``: the checkpoint's files come from the (fake)
hub through huggingface_hub, verified like a pull, then convert offline too."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub, HubFile, HubRepo

from bitserve.cli import main
from bitserve.gguf import read_gguf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "convert"))  # the checkpoint writer
from hf_fixtures import hf_tokenizer, make_model, write_checkpoint

REPO = "microsoft/bitnet-b1.58-2B-4T"


def test_convert_a_repository_then_again_offline(
    hub: FakeHub,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tokenizer = hf_tokenizer()
    folder = write_checkpoint(
        tmp_path / "src", make_model(tokenizer.get_vocab_size()), "packed", tokenizer
    )
    files = {
        p.name: HubFile(p.read_bytes(), lfs=p.suffix == ".safetensors") for p in folder.iterdir()
    }
    files["README.md"] = HubFile(b"# BitNet\n", lfs=False)
    hub.repos[REPO] = HubRepo(files)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    out = tmp_path / "model.gguf"
    assert main(["convert", REPO, str(out)]) == 0
    err = capsys.readouterr().err
    assert "downloading microsoft/bitnet-b1.58-2B-4T/model.safetensors" in err
    assert "README.md" not in err  # only the checkpoint's files
    gguf = read_gguf(out)
    assert gguf.get("general.name") == REPO and gguf.get("general.architecture") == "bitnet-b1.58"
    gguf.close()

    hub.stop()
    hub.clear_log()
    again = tmp_path / "again.gguf"
    assert main(["convert", REPO, str(again), "--offline"]) == 0
    assert again.read_bytes() == out.read_bytes() and hub.log == []

    status = main(["convert", "nobody/missing", str(again), "--offline"])
    assert status == 1
    assert capsys.readouterr().err.endswith(
        "nobody/missing is not downloaded and offline mode forbids downloading it; "
        "run `bitserve convert nobody/missing OUT.gguf` while online\n"
    )
