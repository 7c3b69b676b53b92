"""Write the synthetic checkpoint a config names (harness.synthetic: random weights at a real shape, for throughput
and memory only); prints its directory. Here, not in harness, because a quant option needs its method's config
registered (quant), and harness composes none of quant's.

    python -m experiments.synthetic model=llama2_7b_synthetic quant=awq quant.group_size=128 --root /data/synth
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import quant  # noqa: F401  (registers every method's config, which conf/quant/ selects)
from harness.compose import compose
from harness.synthetic import default_root, materialize


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="write the synthetic checkpoint a config names; prints its directory")
    ap.add_argument("--root", default=None, help="default: <cache>/synthetic (harness.synthetic.default_root)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    cfg = compose(a.overrides)
    print(materialize(cfg, Path(a.root) if a.root else default_root(), Path(a.tokenizer) if a.tokenizer else None, a.device))


if __name__ == "__main__":
    main(sys.argv[1:])
