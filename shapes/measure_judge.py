"""Measure the judge on rendered ground truth and on constructed negatives.

    .venv/bin/python -m shapes.measure_judge --per-family 60 --seed 0

For every canvas size and prompt family: draw prompts, render a scene satisfying each meaning
(edits: the preserved objects completed by `sample_scene`), and count how often `judge` calls it
correct; then corrupt each scene in every applicable way (`negatives.corrupt`) and count how often
the judge rejects it.
"""
from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from shapes.judge import judge
from shapes.layout import sample_scene
from shapes.negatives import NEGATIVE_KINDS, corrupt
from shapes.prompts import FAMILIES, generate
from shapes.scene import render
from shapes.world import SUPPORTED_CANVAS_SIZES


@dataclass(kw_only=True)
class JudgeReport:
    """Counts for one canvas size."""
    canvas_size: int
    correct: Counter = field(default_factory=Counter)        # family -> ground truth judged correct
    total: Counter = field(default_factory=Counter)          # family -> ground truth judged
    rejected: Counter = field(default_factory=Counter)       # negative kind -> judged incorrect
    negatives: Counter = field(default_factory=Counter)      # negative kind -> judged
    failures: list = field(default_factory=list)             # (family, prompt text, failed clauses)

    @property
    def accuracy(self) -> float:
        return sum(self.correct.values()) / max(1, sum(self.total.values()))

    @property
    def rejection(self) -> float:
        return sum(self.rejected.values()) / max(1, sum(self.negatives.values()))


def measure(*, canvas_size: int, per_family: int, seed: int, families: tuple[str, ...] = FAMILIES) -> JudgeReport:
    """Judge `per_family` ground-truth scenes per family and their negatives on one canvas size."""
    rng = random.Random(seed)
    report = JudgeReport(canvas_size=canvas_size)
    for family in families:
        for _ in range(per_family):
            prompt = generate(family, rng, canvas_size=canvas_size)
            scene = sample_scene(prompt.meaning, rng, canvas_size=canvas_size)
            verdict = judge(render(scene), prompt.meaning)
            report.total[family] += 1
            report.correct[family] += verdict.correct
            if not verdict.correct:
                report.failures.append((family, prompt.text, [c.text for c in verdict.clauses if not c.passed]))
            for kind in NEGATIVE_KINDS:
                bad = corrupt(scene, prompt.meaning, kind, rng)
                if bad is not None:
                    report.negatives[kind] += 1
                    report.rejected[kind] += not judge(render(bad), prompt.meaning).correct
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-family", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for size in SUPPORTED_CANVAS_SIZES:
        t0 = time.time()
        r = measure(canvas_size=size, per_family=args.per_family, seed=args.seed)
        fams = " ".join(f"{f}={r.correct[f]}/{r.total[f]}" for f in FAMILIES)
        negs = " ".join(f"{k}={r.rejected[k]}/{r.negatives[k]}" for k in NEGATIVE_KINDS)
        print(f"canvas {size}px: ground truth correct {r.accuracy:.2%} ({sum(r.total.values())} images); "
              f"negatives rejected {r.rejection:.2%} ({sum(r.negatives.values())}); {time.time() - t0:.1f}s")
        print(f"  per family: {fams}")
        print(f"  per negative kind: {negs}")
        for failure in r.failures[:5]:
            print("  FAIL", failure)


if __name__ == "__main__":
    main()
