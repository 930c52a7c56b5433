"""Summary of one module's mutmut run: killed/total, and every survivor with its diff.

Usage (from .ci/mutation): python .ci/mutation_summary.py MODULE SECONDS GLOB...
Writes results/mutation/MODULE.txt; survivors the tests cannot kill are explained in
results/mutation/README.md. `--survivors GLOB...` prints the surviving mutants' names instead.
"""
import collections
import fnmatch
import json
import subprocess
import sys
from pathlib import Path

from mutmut.stats import status_by_exit_code

if sys.argv[1] == "--survivors":
    module, seconds, globs = None, 0, sys.argv[2:]
else:
    module, seconds, globs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
statuses = {}
for meta in Path("mutants").rglob("*.py.meta"):
    for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
        if any(fnmatch.fnmatchcase(name, g) for g in globs):
            statuses[name] = status_by_exit_code[code]
if module is None:
    print(" ".join(sorted(n for n, s in statuses.items() if s in ("survived", "no tests"))))
    sys.exit(0)
counts = collections.Counter(statuses.values())
killed = counts["killed"] + counts["timeout"] + counts["caught by type check"]
total = len(statuses)
lines = [f"mutmut 3 on {module}: {killed}/{total} killed ({100 * killed / max(total, 1):.1f}%), "
         f"{seconds} s wall",
         "statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
         "mutants: " + " ".join(globs), ""]
for name in sorted(n for n, s in statuses.items() if s not in ("killed", "timeout")):
    diff = subprocess.run(["mutmut", "show", name], capture_output=True, text=True).stdout
    lines += [f"## {statuses[name]}: {name}", *[l for l in diff.splitlines()[1:] if l.strip()],
              ""]
out = Path("results/mutation") / f"{module}.txt"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("\n".join(lines) + "\n")
print(lines[0])
