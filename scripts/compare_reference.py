#!/usr/bin/env python3
"""bitserve's logits against two other implementations, on the same random fixtures.

    pip install torch transformers llama-cpp-python     # not test dependencies
    python3 scripts/compare_reference.py [--seeds 5] [--tokens 32] [--json]

For every family's tiny fixture (``bitserve.model.fixtures``: TQ2_0 written by the PyPI
``gguf`` package; I2_S for arch ``bitnet-b1.58``, which only bitserve reads; Q2_0 with a
scale per 64 weights, embedding and tied head included, for ``qwen3`` as Ternary-Bonsai
ships it) and each seed, it runs a random prompt through

- bitserve (the native kernels; ``--kernel numpy`` for the oracle),
- Hugging Face ``transformers`` (``LlamaForCausalLM``, ``Qwen3ForCausalLM``,
  ``BitNetForCausalLM``) in float64 on the dequantized weights, q/k rows put back in
  trained order by inverting llama.cpp's converter permutation, with BitNet's per-token
  absmax int8 activation quantization added as a forward pre-hook on every projection
  (Q2_0 matrices quantize per block of 32 instead, as bitserve and llama.cpp run Bonsai;
  MiniCPM has no transformers class: skipped),
- llama.cpp through ``llama-cpp-python`` on the file itself (arch ``llama``, ``qwen3``,
  ``minicpm``, and ``bitnet`` with SiLU, which is what upstream's ``bitnet`` graph runs;
  it cannot read I2_S nor the ``bitnet-b1.58`` arch),

and prints the top-1 agreement (share of positions where the argmax agrees) and the
relative L2 distance of the logits.

transformers runs in float64 with bitserve's per-token rule, so its rows show only
float32-vs-float64 and int8-rounding flips. llama.cpp rounds in other places: it
quantizes activations in blocks of 256 (Q8_K, scale -127/max, for its TQ2_0 dot product)
where BitNet and bitserve quantize per token, stores its per-32 activation scales for Q2_0
(Q8_0) in F16 where bitserve keeps f32, keeps its KV cache in F16, and converts q, the
softmax probabilities and the head's input to F16. On
these small random models one rounding flip at one layer moves everything after it, so
its rows differ by a few percent; the last row (transformers with exactly those roundings
against llama.cpp) shows that the roundings are the whole difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bitserve.gguf.constants import GGMLType
from bitserve.gguf.quants import unpack_i2s
from bitserve.gguf.reader import read_gguf
from bitserve.model import BitNetModel
from bitserve.model.fixtures import FAMILIES, gguf_package_packer, write_family_fixture

HF_CLASSES = {"llama": "Llama", "qwen3": "Qwen3", "bitnet": "BitNet", "bitnet-b1.58": "BitNet"}
LLAMA_CPP_ARCHS = ("llama", "qwen3", "minicpm", "bitnet")
# (ours, theirs): bitserve against each reference; then transformers with llama.cpp's
# roundings against llama.cpp, which shows where bitserve and llama.cpp differ
PAIRS = (
    ("bitserve", "transformers"),
    ("bitserve", "llama.cpp"),
    ("transformers+rounding", "llama.cpp"),
)

PROJECTIONS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}  # fmt: skip
NORMS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_sub_norm": "self_attn.attn_sub_norm", "ffn_sub_norm": "mlp.ffn_sub_norm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}  # fmt: skip


def fixture(folder: Path, family: str, seed: int) -> Path:
    ternary = {"bitnet-b1.58": GGMLType.I2_S, "qwen3": GGMLType.Q2_0}.get(family, GGMLType.TQ2_0)
    return write_family_fixture(folder / f"{family}-{seed}.gguf", family, ternary, seed=seed,
                                pack=gguf_package_packer(ternary))  # fmt: skip


def bitserve_logits(path: Path, tokens: list[int], kernel: str | None) -> np.ndarray:
    with BitNetModel.load(path, backend=kernel) as model:
        return model.forward(tokens, model.new_cache(len(tokens)), all_logits=True)


# ---- Hugging Face transformers --------------------------------------------------------------


def _dequantized(g: Any, name: str) -> np.ndarray:
    """A tensor as float64 ``[rows, cols]`` (ternary: codes times their scales)."""
    import gguf

    info = g.tensors[name]
    if len(info.shape) == 1:
        return np.array(g.array(name), dtype=np.float64)
    rows, cols = info.shape
    if info.ggml_type == GGMLType.I2_S:
        codes, scale = unpack_i2s(g.raw(name), rows, cols)
        return codes.astype(np.float64) * scale
    if info.ggml_type == GGMLType.Q2_0:  # ggml's dequantize_row_q2_0 (gguf has no Q2_0)
        blocks = np.asarray(g.raw(name)).reshape(-1, 18)
        d = blocks[:, :2].copy().view("<f2").astype(np.float64)  # [n, 1]
        codes = (blocks[:, 2:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3  # byte j/4
        return ((codes.reshape(-1, 64).astype(np.float64) - 1) * d).reshape(rows, cols)
    if info.ggml_type.name in ("TQ1_0", "TQ2_0", "Q8_0", "Q6_K", "BF16"):
        qtype = gguf.GGMLQuantizationType[info.ggml_type.name]
        raw = np.asarray(g.raw(name)).reshape(rows, -1)
        return gguf.quants.dequantize(raw, qtype).astype(np.float64).reshape(rows, cols)
    return np.array(g.array(name), dtype=np.float64)


def _trained_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert convert_hf_to_gguf's LlamaModel.permute: it stored
    ``w.reshape(H, 2, D/2, in).swapaxes(1, 2)``; swapping back restores the HF rows."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def quantize_per_token(x: Any) -> Any:
    """BitNet's activation quantization: absmax int8 per token (round half to even)."""
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * s).round().clamp(-128, 127) / s


def quantize_block32(x: Any) -> Any:
    """bitserve's BLOCK32 rule for Q2_0 (Ternary-Bonsai): absmax per 32 values, half to even."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    peak = blocks.abs().amax(dim=-1, keepdim=True)
    s = 127.0 / peak.clamp(min=1e-30)
    return ((blocks * s).round().clamp(-128, 127) / s).where(peak > 0, 0.0).reshape(x.shape)


def quantize_q8_0(x: Any) -> Any:
    """llama.cpp's Q8_0 activations (its Q2_0 dot product, AVX2 path): per 32 values,
    ``q = round_half_even(x · 127/absmax)`` in float32, and the scale ``absmax/127`` stored
    as F16 (where bitserve keeps it in f32)."""
    import torch

    blocks = x.reshape(*x.shape[:-1], -1, 32)
    peak = blocks.abs().amax(dim=-1, keepdim=True).float()
    inv = torch.where(peak > 0, 127.0 / peak, torch.zeros_like(peak))
    q = (blocks.float() * inv).round().clamp(-128, 127)
    d = (peak / 127.0).half().to(x.dtype)
    return (q.to(x.dtype) * d).reshape(x.shape)


def quantize_q8_k(x: Any) -> Any:
    """llama.cpp's activation quantization for TQ1_0/TQ2_0 dot products (Q8_K): blocks of 256,
    scale -127 / (the value of largest magnitude), codes rounded half to even."""
    import torch

    blocks = x.reshape(*x.shape[:-1], -1, 256)
    peak = torch.gather(blocks, -1, blocks.abs().argmax(dim=-1, keepdim=True))
    iscale = torch.where(peak == 0, torch.zeros_like(peak), -127.0 / peak)
    q = (blocks * iscale).round().clamp(max=127)
    out = torch.where(iscale == 0, torch.zeros_like(blocks), q / iscale)
    return out.reshape(x.shape)


def f16_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """transformers' eager attention with llama.cpp's CPU roundings: an F16 KV cache, q
    converted to F16 for the K·q product, the softmax probabilities to F16 for V."""
    import torch

    def f16(t: Any) -> Any:
        return t.half().to(query.dtype)

    group = module.num_key_value_groups
    k = f16(key).repeat_interleave(group, dim=1)
    v = f16(value).repeat_interleave(group, dim=1)
    scores = torch.matmul(f16(query), k.transpose(2, 3)) * scaling
    n_q, n_k = scores.shape[-2:]
    future = torch.ones(n_q, n_k, dtype=torch.bool).triu(n_k - n_q + 1)  # causal, always
    scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return torch.matmul(f16(probs), v).transpose(1, 2).contiguous(), probs


def hf_model(path: Path, llama_cpp_rounding: bool = False) -> Any:
    """The fixture as a transformers model in float64, activations quantized per token (or,
    with ``llama_cpp_rounding``, rounded where llama.cpp's CPU path rounds them: Q8_K blocks
    of 256 into ternary projections, float16 into the F16 head and in attention)."""
    import torch
    import transformers

    with read_gguf(path) as g:
        arch = g.metadata["general.architecture"]
        hp = {k[len(arch) + 1 :]: v for k, v in g.metadata.items() if k.startswith(arch + ".")}
        tensors = {name: _dequantized(g, name) for name in g.tensors}
        q2_0 = {name for name, info in g.tensors.items() if info.ggml_type == GGMLType.Q2_0}
    n_heads, n_kv = hp["attention.head_count"], hp["attention.head_count_kv"]
    head_dim = hp.get("attention.key_length", hp["embedding_length"] // n_heads)
    kind = HF_CLASSES[arch]
    act = "relu2" if arch == "bitnet-b1.58" else "silu"
    config = getattr(transformers, f"{kind}Config")(
        vocab_size=tensors["token_embd.weight"].shape[0], hidden_size=hp["embedding_length"],
        intermediate_size=hp["feed_forward_length"], num_hidden_layers=hp["block_count"],
        num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
        rms_norm_eps=hp["attention.layer_norm_rms_epsilon"], rope_theta=hp["rope.freq_base"],
        max_position_embeddings=hp["context_length"], hidden_act=act,
        tie_word_embeddings="output.weight" not in tensors, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    if llama_cpp_rounding:
        transformers.AttentionInterface.register("llama_cpp_f16", f16_attention)
        config._attn_implementation = "llama_cpp_f16"
    model = getattr(transformers, f"{kind}ForCausalLM")(config).double().eval()
    state: dict[str, Any] = {"model.embed_tokens.weight": tensors["token_embd.weight"],
                             "model.norm.weight": tensors["output_norm.weight"]}  # fmt: skip
    state["lm_head.weight"] = tensors.get("output.weight", tensors["token_embd.weight"])
    for i in range(hp["block_count"]):
        for ours, theirs in NORMS.items():
            if f"blk.{i}.{ours}.weight" in tensors:
                state[f"model.layers.{i}.{theirs}.weight"] = tensors[f"blk.{i}.{ours}.weight"]
        for ours, theirs in PROJECTIONS.items():
            w = tensors[f"blk.{i}.{ours}.weight"]
            if arch in ("llama", "minicpm") and ours in ("attn_q", "attn_k"):
                w = _trained_order(w, n_heads if ours == "attn_q" else n_kv)
            state[f"model.layers.{i}.{theirs}.weight"] = w
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=False
    )
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")

    # how each matrix's input is rounded: Q2_0 per 32 (bitserve's BLOCK32, or llama.cpp's
    # Q8_0), the other ternary types per token (or llama.cpp's Q8_K), float heads not at all
    # (llama.cpp: F16)
    ternary_rule = quantize_q8_k if llama_cpp_rounding else quantize_per_token
    q2_0_rule = quantize_q8_0 if llama_cpp_rounding else quantize_block32
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    for name, module in model.named_modules():
        parts = name.split(".", 3)  # model, layers, i, rest
        ours = next((o for o, t in PROJECTIONS.items() if parts[-1] == t), None)
        if len(parts) == 4 and parts[1] == "layers" and ours is not None:
            rule = q2_0_rule if f"blk.{parts[2]}.{ours}.weight" in q2_0 else ternary_rule
        elif name == "lm_head" and head in q2_0:
            rule = q2_0_rule
        elif name == "lm_head" and llama_cpp_rounding:  # ggml's F16 matmul takes F16 input
            rule = _f16
        else:
            continue
        module.register_forward_pre_hook(lambda _m, a, rule=rule: (rule(a[0]), *a[1:]))
    return model


def _f16(x: Any) -> Any:
    return x.half().to(x.dtype)


def hf_logits(path: Path, tokens: list[int], llama_cpp_rounding: bool = False) -> np.ndarray:
    import torch

    model = hf_model(path, llama_cpp_rounding)
    with torch.no_grad():
        out = model(torch.tensor([tokens])).logits[0]
    return np.asarray(out.numpy(), dtype=np.float64)


# ---- llama.cpp -------------------------------------------------------------------------------


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=max(64, len(tokens)), n_batch=len(tokens),
                n_threads=2, logits_all=True, verbose=False)  # fmt: skip
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


# ---- the comparison --------------------------------------------------------------------------


def compare(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    agreement = float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))
    return agreement, float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def available(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="fixtures per family (default: 5)")
    p.add_argument("--tokens", type=int, default=32, help="prompt length in tokens (default: 32)")
    p.add_argument("--kernel", default=None, help="bitserve kernel (default: the best)")
    p.add_argument("--json", action="store_true", help="one JSON object per comparison")
    args = p.parse_args()
    have_hf = available("transformers") and available("torch")
    have_llama_cpp = available("llama_cpp")
    if not (have_hf or have_llama_cpp):
        print("compare_reference: install transformers+torch and/or llama-cpp-python",
              file=sys.stderr)  # fmt: skip
        return 2
    totals: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            for seed in range(args.seeds):
                path = fixture(Path(tmp), family, seed)
                rng = np.random.default_rng(1000 + seed)
                tokens = [int(t) for t in rng.integers(0, 2000, args.tokens)]
                logits = {"bitserve": bitserve_logits(path, tokens, args.kernel)}
                if have_hf and family in HF_CLASSES:
                    logits["transformers"] = hf_logits(path, tokens)
                if have_llama_cpp and family in LLAMA_CPP_ARCHS:
                    logits["llama.cpp"] = llama_cpp_logits(path, tokens)
                    if have_hf and family in HF_CLASSES:
                        logits["transformers+rounding"] = hf_logits(path, tokens, True)
                for ours, theirs in PAIRS:
                    if ours in logits and theirs in logits:
                        agreement, rel_l2 = compare(logits[ours], logits[theirs])
                        totals.setdefault((family, f"{ours} vs {theirs}"), []).append(
                            (agreement, rel_l2)
                        )
                        if args.json:
                            print(json.dumps({"family": family, "seed": seed, "ours": ours,
                                              "theirs": theirs, "top1_agreement": agreement,
                                              "rel_l2": rel_l2}))  # fmt: skip
    print(f"{'family':<14}{'comparison':<42}{'n':>3}{'top-1 agreement':>20}{'rel. L2':>9}")
    for (family, pair), rows in totals.items():
        agree, worst = float(np.mean([a for a, _ in rows])), min(a for a, _ in rows)
        l2 = float(np.mean([r for _, r in rows]))
        print(f"{family:<14}{pair:<42}{len(rows):>3}{agree:>12.1%} (min {worst:.0%}){l2:>9.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
