"""Write a synthetic checkpoint in Kimi-K2's exact layout.

    python scripts/make_checkpoint.py --preset tiny --out DIR [--seed S]
    python scripts/make_checkpoint.py --preset k2-slice --layers 3 --out DIR
    python scripts/make_checkpoint.py --preset tiny --format int4 --out DIR             # K2-Thinking's layout
    python scripts/make_checkpoint.py --preset tiny --format int4 --layout k25 --out DIR  # K2.5's nested layout
    python scripts/make_checkpoint.py --config my_config.json --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hybrid.presets import SYNTHETIC_PRESETS, synthetic_config  # noqa: E402
from hybrid.synthetic import write_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(SYNTHETIC_PRESETS))
    src.add_argument("--config", type=Path, help="any K2-style config.json")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, help="number of layers (first dense); default: the preset's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-mb", type=float, default=4096, help="shard size limit in MB (default 4096)")
    p.add_argument("--format", choices=("fp8", "int4"), default="fp8",
                   help="fp8: K2-Instruct (block-fp8); int4: K2-Thinking (INT4 routed experts, bf16 rest)")
    p.add_argument("--layout", choices=("flat", "k25"), default="flat",
                   help="k25: kimi_k25's nested multimodal layout (INT4; vision tensors the runtime skips)")
    args = p.parse_args(argv)
    if args.config:
        config = json.loads(args.config.read_text())
        if args.layers:
            config["num_hidden_layers"] = args.layers
    else:
        config = synthetic_config(args.preset, layers=args.layers, fmt=args.format, layout=args.layout)
    out = write_checkpoint(args.out, config, seed=args.seed, shard_bytes=int(args.shard_mb * 1e6))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
