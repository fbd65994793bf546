"""Benchmarks behind `python -m msa_cupy bench`: one module per suite, one shared harness."""
