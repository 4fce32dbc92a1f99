#!/usr/bin/env python3
"""Write a random BitNet b1.58 GGUF of a given shape, with a working tokenizer.

    python3 scripts/make_synthetic_model.py /tmp/bitnet-2b4t-random.gguf            # 2B-4T shape
    python3 scripts/make_synthetic_model.py /tmp/small.gguf --layers 4 --dim 512 ...

The 2B-4T preset has the official file's shapes (30 layers, 2560/6912, 20/5 heads, vocab
128256, I2_S projections, F16 tied embedding) and a LLaMA-3-shaped token table (the demo
tokenizer padded with control tokens so BOS/EOS/EOT sit at 128000/128001/128009), so
`bitserve generate -m` and `bitserve serve -m` work on it. Its weights are random.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from bitserve.model.demo import demo_tokenizer_metadata, llama3_tokenizer_metadata
from bitserve.model.synthetic import SHAPE_2B4T, write_synthetic_model


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("path")
    p.add_argument("--layers", type=int, default=SHAPE_2B4T.n_layers)
    p.add_argument("--dim", type=int, default=SHAPE_2B4T.dim)
    p.add_argument("--ffn", type=int, default=SHAPE_2B4T.ffn_dim)
    p.add_argument("--heads", type=int, default=SHAPE_2B4T.n_heads)
    p.add_argument("--kv-heads", type=int, default=SHAPE_2B4T.n_kv_heads)
    p.add_argument(
        "--vocab",
        type=int,
        default=SHAPE_2B4T.vocab_size,
        help="128256 gives a LLaMA-3-shaped token table; smaller uses the demo tokenizer",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    shape = dataclasses.replace(
        SHAPE_2B4T,
        n_layers=args.layers,
        dim=args.dim,
        ffn_dim=args.ffn,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        vocab_size=args.vocab,
    )
    if shape.vocab_size == 128256:
        tokenizer = llama3_tokenizer_metadata(shape.vocab_size)
    else:
        tokenizer = demo_tokenizer_metadata()
        n_tokens = len(tokenizer["tokenizer.ggml.tokens"])
        if shape.vocab_size != n_tokens:
            p.error(f"--vocab must be 128256 or the demo tokenizer's {n_tokens}")
    start = time.perf_counter()
    print(f"writing {shape} to {args.path} ...", file=sys.stderr)
    write_synthetic_model(args.path, shape, seed=args.seed, tokenizer_metadata=tokenizer)
    print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
