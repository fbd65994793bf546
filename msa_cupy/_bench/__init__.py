"""Benchmarks behind `python -m msa_cupy bench`, all on one harness (harness.py).

``SUITES`` maps each suite name to its runner ``run(report, ceilings, tokens=None, **options)``:
``report(name, **fields)`` receives each result row, ``ceilings`` are the card's measured copy
and matmul rates (``harness.ceilings()``), and ``tokens`` (positive ints) replaces the suite's
default context lengths.  Runners check their arguments before any GPU work.
"""
from __future__ import annotations

import numbers

from . import decode, decode_host, jax_decode, paper, plain, prefill_plan, selection, sparse_attention


def check_tokens(tokens) -> tuple:
    """tokens as a non-empty tuple of positive ints, or TypeError/ValueError naming it."""
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
        raise TypeError(f"tokens must be a sequence of ints, got {type(tokens).__name__}")
    tokens = tuple(tokens)
    if not tokens:
        raise ValueError("tokens must hold at least one length")
    for n in tokens:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"tokens must be ints, got {n!r}")
        if n < 1:
            raise ValueError(f"tokens must be >= 1, got {n}")
    return tuple(int(n) for n in tokens)


def _suite(name, run):
    """The runner of suite `name`: checks tokens, records the suite in the report, runs."""
    def runner(report, ceilings, tokens=None, **options):
        if tokens is not None:
            options["tokens"] = check_tokens(tokens)
        suites = report.meta.setdefault("suites", []) if hasattr(report, "meta") else []
        if name not in suites:
            suites.append(name)
        return run(report, ceilings, **options)

    runner.__name__ = runner.__qualname__ = f"run_{name}"
    runner.__doc__ = run.__doc__
    runner.run = run
    return runner


SUITES = {
    "paper": _suite("paper", paper.run),
    "plain": _suite("plain", plain.run),
    "selection": _suite("selection", selection.run),
    "select_variants": _suite("select_variants", selection.run_variants),
    "sparse": _suite("sparse", sparse_attention.run),
    "decode_host": _suite("decode_host", decode_host.run),
    "decode": _suite("decode", decode.run),
    "jax_decode": _suite("jax_decode", jax_decode.run),
    "prefill_plan": _suite("prefill_plan", prefill_plan.run),
}
