#!/usr/bin/env python3
"""Write a random ternary GGUF of a given shape and family, with a working tokenizer.

    python3 scripts/make_synthetic_model.py /tmp/bitnet-2b4t-random.gguf           # 2B-4T shape
    python3 scripts/make_synthetic_model.py /tmp/falcon3-7b.gguf --preset falcon3-7b
    python3 scripts/make_synthetic_model.py /tmp/small.gguf --layers 4 --dim 512 ...
    python3 scripts/make_synthetic_model.py --list                                  # the presets

A preset is a published model's shape and file layout (architecture, which norms exist,
tied or untied head, head size, RoPE base, vocabulary size): bitnet-2b4t, falcon3-1b/3b/
7b/10b, llama3-8b-1.58, bonsai-1.7b/4b/8b (Q2_0, as Ternary-Bonsai ships; `--type`
another ternary type), with a tokenizer of the family's kind padded to its vocabulary.
The default is 2B-4T's (30 layers, 2560/6912, 20/5 heads, vocab 128256, I2_S projections,
F16 tied embedding) with a LLaMA-3-shaped token table (the demo tokenizer padded with
control tokens so BOS/EOS/EOT sit at vocab - 256 + 0/1/9). `bitserve generate -m`,
`serve -m` and `bench -m` work on every one. Weights are random.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from bitserve.gguf.constants import GGMLType
from bitserve.model.demo import demo_tokenizer_metadata, llama3_tokenizer_metadata
from bitserve.model.fixtures import write_preset
from bitserve.model.synthetic import (
    PRESETS,
    PUBLISHED,
    SHAPE_2B4T,
    TERNARY_PACKERS,
    write_synthetic_model,
)

# the flags that change the default (2B-4T) shape, and the ModelShape field each sets
SHAPE_FLAGS = {
    "--layers": "n_layers",
    "--dim": "dim",
    "--ffn": "ffn_dim",
    "--heads": "n_heads",
    "--kv-heads": "n_kv_heads",
    "--vocab": "vocab_size",
}


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("path", nargs="?")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a published model's shape")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument(
        "--type",
        choices=[t.name.lower() for t in TERNARY_PACKERS],
        help="ternary projection type (default: the preset's)",
    )
    n_demo = len(demo_tokenizer_metadata()["tokenizer.ggml.tokens"])
    helps = {"--vocab": f"{SHAPE_2B4T.vocab_size} (the default) gives a LLaMA-3-shaped token "
             f"table, {n_demo} the demo tokenizer itself; no other size is accepted"}  # fmt: skip
    for flag, field in SHAPE_FLAGS.items():
        default = helps.get(flag, f"default: {getattr(SHAPE_2B4T, field)}")
        p.add_argument(flag, type=int, dest=field, metavar="N",
                       help=f"{default} (not with --preset)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    given = {
        flag: getattr(args, f) for flag, f in SHAPE_FLAGS.items() if getattr(args, f) is not None
    }
    if args.list:
        for name, preset in PRESETS.items():
            s, layout = preset.shape, preset.layout
            print(f"{name:16} {layout.arch:13} {s.n_layers} layers, {s.dim}/{s.ffn_dim}, "
                  f"{s.n_heads}/{s.n_kv_heads} heads of {s.head_size}, vocab {s.vocab_size} "
                  f"({preset.source})")  # fmt: skip
        return 0
    if args.path is None:
        p.error("the output path is required")
    if args.preset and given:
        p.error(f"{', '.join(given)}: a preset has its own shape; drop them or --preset")
    ternary = GGMLType[args.type.upper()] if args.type else None
    start = time.perf_counter()
    if args.preset:
        print(f"writing {args.preset} to {args.path} ...", file=sys.stderr)
        write_preset(args.path, args.preset, ternary, seed=args.seed)
    else:
        shape = dataclasses.replace(
            SHAPE_2B4T, **{SHAPE_FLAGS[flag]: value for flag, value in given.items()}
        )
        if shape.vocab_size == 128256:
            tokenizer = llama3_tokenizer_metadata(shape.vocab_size)
        else:
            tokenizer = demo_tokenizer_metadata()
            if shape.vocab_size != n_demo:
                p.error(f"--vocab must be 128256 or the demo tokenizer's {n_demo}")
        layout = dataclasses.replace(PUBLISHED, ternary=ternary or GGMLType.I2_S)
        print(f"writing {shape} to {args.path} ...", file=sys.stderr)
        write_synthetic_model(args.path, shape, seed=args.seed, tokenizer_metadata=tokenizer,
                              layout=layout)  # fmt: skip
    print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
