"""Standalone runner for the selection benchmarks (msa_cupy._bench.selection).

    PYTHONPATH=$PWD python3 benchmarks/selection_dev.py [--quick] [--json PATH]

Ceilings (copy GB/s read+write, bf16 matmul TFLOP/s) are measured first, in the same process,
on the same card; every row is printed as it completes and the whole set is written as JSON.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from msa_cupy._bench import harness, selection  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the 1M-token prefill")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "benchmarks"), "selection.json"))
    args = ap.parse_args()
    report = harness.Report()
    report.meta["card"] = harness.card()
    selection.run(report, quick=args.quick)
    report.write(args.json)


if __name__ == "__main__":
    main()
