"""Standalone benchmark scripts: `python -m bench.benchmarks.<name> --out results/<file>.jsonl`."""
