"""Child process of an isolated sweep: reads one RunConfig as JSON on stdin, prints its row."""
import json
import sys

from bench.measure.config import RunConfig
from bench.measure.row import measure_config
from bench.measure.sweep import ROW_MARKER


def main() -> None:
    cfg = RunConfig.from_json(json.loads(sys.stdin.read()))
    row = measure_config(cfg)
    sys.stdout.write(ROW_MARKER + json.dumps(row, default=str) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
