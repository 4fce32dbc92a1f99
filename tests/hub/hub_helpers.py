"""Helpers of the hub tests: a Puller on the fake hub that keeps its messages, the
official 2B-4T GGUF repository's layout, and model files (GGUF headers, random bodies)."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from fake_hub import HubFile, HubRepo

from bitserve.hub import Catalog, HubOptions, ModelRecord, Puller, Registry, resolve

BITNET_REPO = "microsoft/bitnet-b1.58-2B-4T-gguf"


@dataclass
class HubClient:
    """A Puller on the fake hub, and the sentences it reported."""

    options: HubOptions
    registry: Registry
    messages: list[str] = field(default_factory=list)

    def puller(self, **changes: object) -> Puller:
        options = HubOptions(**{**_fields(self.options), **changes})  # type: ignore[arg-type]
        return Puller(options, self.registry, self.messages.append)

    def pull(self, name: str, **changes: object) -> ModelRecord:
        return self.puller(**changes).pull(resolve(name, Catalog.load()))


def _fields(options: HubOptions) -> dict[str, object]:
    keys = ("endpoint", "cache_dir", "token", "offline", "answer_timeout_s", "stall_s")
    return {k: getattr(options, k) for k in keys}


def bitnet_repo(content: bytes) -> HubRepo:
    """The official 2B-4T GGUF repository's layout, with ``content`` as the model file."""
    return HubRepo(
        {
            "ggml-model-i2_s.gguf": HubFile(content),
            "README.md": HubFile(b"# BitNet b1.58 2B4T\n", lfs=False),
            ".gitattributes": HubFile(b"*.gguf filter=lfs\n", lfs=False),
        }
    )


def gguf_bytes(size: int, arch: str = "bitnet") -> bytes:
    """A GGUF file of exactly ``size`` bytes (at least 106) that bitserve's reader accepts:
    no tensors, ``general.architecture``, and a random ``general.padding`` string (so each
    call is a file of its own sha256)."""

    def text(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    string = struct.pack("<I", 8)  # GGUFValueType.STRING
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + text("general.architecture") + string
    head += text(arch) + text("general.padding") + string
    room = size - len(head) - 8
    if room < 0:
        raise ValueError(f"a GGUF file takes at least {len(head) + 8} bytes")
    return head + text(os.urandom(room // 2 + 1).hex()[:room])


def gguf_of_unknown_tensor_type(type_id: int = 99) -> bytes:
    """A well-formed GGUF file (architecture ``bitnet``) whose one tensor has a type id no
    bitserve reads, as a file of a newer llama.cpp quantization would."""

    def text(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + text("general.architecture")
    head += struct.pack("<I", 8) + text("bitnet")  # GGUFValueType.STRING
    head += text("blk.0.attn_q.weight") + struct.pack("<IQIQ", 1, 256, type_id, 0)
    head += bytes(-len(head) % 32)  # general.alignment's default
    return head + bytes(256)
