"""Every CPU benchmark, one after another (`make bench`); each writes its JSON under results/benchmarks/.

    python -m benchmarks.run_all

GPU benchmarks (benchmarks/lmdeploy_throughput.py, benchmarks/lmdeploy_ppl.py) run on the GPU machine; see
results/gpu/README.md for their commands.
"""
from __future__ import annotations

import argparse
import runpy
import sys

CPU_BENCHMARKS = ["benchmarks.awq_time", "benchmarks.ppl_throughput", "benchmarks.decode_cpu"]


def main() -> None:
    # no options of its own; parsing still makes --help print this instead of starting every benchmark
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    for mod in CPU_BENCHMARKS:
        print(f"=== {mod}", flush=True)
        sys.argv = [mod]
        runpy.run_module(mod, run_name="__main__")


if __name__ == "__main__":
    main()
