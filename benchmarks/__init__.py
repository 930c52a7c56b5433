"""Standalone benchmark scripts: `python -m benchmarks.<name> --out results/<file>.jsonl`."""
