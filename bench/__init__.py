"""Benchmarks of fpt against a local re-implementation of the official FPT+ approach (bench/official.py).

One module per figure, each run as ``python -m fpt.bench.<figure>``; see bench/README.md. Not part of the
installed package and never imported by fpt itself.
"""
