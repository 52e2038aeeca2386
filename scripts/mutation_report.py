"""Summarise a `mutmut run` (mutants/**/*.meta): killed / survived per module, then each survivor.

    python scripts/mutation_report.py            # after `mutmut run` (make mutants runs both)

Statuses are mutmut's own (mutmut.stats.status_by_exit_code): "killed" (a test failed), "timeout"
(the mutant hung: also a kill), "survived" (every test passed), "no tests" (no fast test covers it).
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

KILLED = ("killed", "timeout", "caught by type check")


def main(root: str = "mutants") -> int:
    metas = sorted(Path(root).rglob("*.py.meta"))
    if not metas:
        print(f"no mutmut results under {root}/: run `make mutants` first", file=sys.stderr)
        return 2
    rows, survivors = [], []
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if not codes:
            continue
        counts = Counter(status_by_exit_code[c] for c in codes.values())
        module = str(meta.relative_to(root)).removesuffix(".meta")
        rows.append((module, counts))
        survivors += [name for name, c in codes.items() if status_by_exit_code[c] not in KILLED]
    total = sum((c for _, c in rows), Counter())
    width = max(len(m) for m, _ in rows)
    print(f"{'module':{width}s} {'mutants':>8s} {'killed':>7s} {'survived':>9s} {'other':>6s}")
    for module, c in rows + [("total", total)]:
        killed = sum(c[k] for k in KILLED)
        print(f"{module:{width}s} {sum(c.values()):8d} {killed:7d} {c['survived']:9d} "
              f"{sum(c.values()) - killed - c['survived']:6d}")
    if survivors:
        print(f"\n{len(survivors)} survivors (`mutmut show NAME` prints the change; docs/testing.md explains "
              "the equivalent ones):")
        for name in survivors:
            print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
