#!/usr/bin/env python
"""Build the offline code-switching testbed (or speak your own transcripts) into an output folder.

Examples:
  python scripts/build_testbed.py --out testbed
  python scripts/build_testbed.py --out tiny --small
  python scripts/build_testbed.py --out mine --text-file lines.txt --pair es-en
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run from a checkout without installing: the repository root holds the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyro_blora.testbed import TestbedConfig, build_from_text, build_testbed


def _parser() -> argparse.ArgumentParser:
    defaults = TestbedConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (must be empty unless --overwrite)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--small", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--pairs", nargs="+", default=list(defaults.pairs), help="built-in pairs: zh-en es-en ar-en de-en fr-en")
    parser.add_argument("--codeswitch-sizes", nargs=3, type=int, metavar=("TRAIN", "DEV", "TEST"))
    parser.add_argument("--english-sizes", nargs=3, type=int, metavar=("TRAIN", "DEV", "TEST"))
    parser.add_argument("--backward-languages", nargs="*", default=None)
    parser.add_argument("--backward-size", type=int)
    parser.add_argument("--english-noise-fraction", type=float)
    parser.add_argument("--text-file", type=Path, help="speak these transcripts (one per line) instead")
    parser.add_argument("--pair", default="en", help="language pair of --text-file, e.g. es-en, or en")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {"pairs": tuple(args.pairs)}
    for name in ("codeswitch_sizes", "english_sizes", "backward_languages", "backward_size", "english_noise_fraction"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = tuple(value) if isinstance(value, list) else value
    config = TestbedConfig.small(**overrides) if args.small else TestbedConfig(**overrides)
    if args.text_file is not None:
        path = build_from_text(args.text_file, args.out, args.pair, config, seed=args.seed, overwrite=args.overwrite)
        print(f"wrote {path}")
    else:
        for domain, path in build_testbed(args.out, config, seed=args.seed, overwrite=args.overwrite).items():
            print(f"{domain}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
