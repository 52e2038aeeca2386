"""Self-reflective refinement on the shapes world: does RT2I+SRR training teach inference-time SRR to fix
what its first pass gets wrong, without breaking what it gets right? (issue 17; a benchmark, not a test)

    python -m driver.experiments.srr [--steps 12] [--seeds 0 1] [--per-category 6] [overrides ...]

For the shipped checkpoint, each training seed and a shuffled-advantage control (same config, seed 0,
trainer.shuffle_advantages=true), inference-time SRR (driver.refine: refine while the model's own
DVReward is below refine.threshold; keep a refinement only if its own reward is higher; the judge only
reports) runs on held-out shapes-geneval prompts. Training: sync mode, tasks {rt2i: 0.5, srr: 0.5},
from checkpoints/shapes-base. The table (fixes = share of first-pass failures made right, breaks = share
of first-pass successes made wrong, one-pass accuracy = the first pass, i.e. RT2I transfer) goes to
docs/results.md with the command and the machine. Goal (issue 17): fixes >= 30 %, breaks <= 2 % after
training. Nothing here is tuned on the held-out prompts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from driver.config import load
from driver.experiments.results import command_line, machine, write_section
from driver.refine import run as refine_run
from driver.sync import train_sync
from worlds.base import CRITIQUE_KINDS
from worlds.load import load_world

BASE = ["trainer.mode=sync", "tasks.rt2i=0.5", "tasks.srr=0.5", "eval.enabled=false", "run.out_dir=runs/experiments"]
HELDOUT = "data.heldout.options={families: [single_object, two_objects, counting, colors, position, color_attr, " \
          "implicit_color, implicit_count]}"


def evaluate(checkpoint: str, per_category: int, overrides: list[str], out: Path) -> dict[str, float]:
    """driver.refine's summary, and the kinds of critique it wrote (shapes.critiques)."""
    cfg = load(BASE + [HELDOUT, f"policy.checkpoint={checkpoint}", f"eval.prompts_per_category={per_category}",
                       "eval.images_per_prompt=1", *overrides])
    summary = refine_run(cfg, out_dir=out)
    judge = load_world(cfg.data.heldout.source, key="data.heldout.source").judge()
    return summary | critique_shares(out / "results.jsonl", judge.critique_kind)


def critique_shares(results: Path, kind) -> dict[str, float]:
    """The share of each critique kind (`kind`: the world judge's critique_kind) among every critique in
    driver.refine's results.jsonl."""
    critiques = [c for line in results.read_text().splitlines() if line.strip()
                 for c in json.loads(line)["critiques"]]
    kinds = [kind(c) for c in critiques]
    return {f"critiques/{k}": (kinds.count(k) / len(kinds) if kinds else 0.0) for k in CRITIQUE_KINDS} | \
        {"critiques/n": len(kinds)}


def row(name: str, m: dict[str, float], minutes: float | None) -> str:
    pct = lambda k: f"{100 * m[k]:.1f}"  # noqa: E731
    return (f"| {name} | {pct('judge/first')} | {pct('judge/final')} | {pct('judge/fixes')} ({m['judge/fixes_n']:.0f}) "
            f"| {pct('judge/breaks')} ({m['judge/breaks_n']:.0f}) | {m['reward/first']:.3f} -> {m['reward/final']:.3f} "
            f"| {pct('refined')} | {pct('changed')} | {m['critiques/n']:.0f}: {pct('critiques/instruction')} / "
            f"{pct('critiques/description')} / {pct('critiques/answer')} | {'-' if minutes is None else f'{minutes:.1f}'} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--per-category", type=int, default=6, help="held-out prompts per category")
    ap.add_argument("--no-control", action="store_true")
    ap.add_argument("overrides", nargs="*", help="config overrides for training and evaluation")
    args = ap.parse_args(argv)
    out = Path("runs/experiments/srr")
    rows = [row("shipped (no SRR training)", evaluate("checkpoints/shapes-base", args.per_category, args.overrides,
                                                       out / "shipped"), None)]
    print(rows[-1], flush=True)
    runs = [(f"seed {s}", s, []) for s in args.seeds]
    if not args.no_control:
        runs.append(("control: shuffled advantages, seed 0", 0, ["trainer.shuffle_advantages=true"]))
    for name, seed, extra in runs:
        tag = name.split(":")[0].replace(" ", "")
        cfg = load(BASE + [f"trainer.steps={args.steps}", f"run.seed={seed}", f"run.name=srr-{tag}", *extra,
                           *args.overrides])
        t0 = time.perf_counter()
        policy = out / tag / "policy"
        train_sync(cfg, save_to=policy)
        minutes = (time.perf_counter() - t0) / 60
        rows.append(row(name, evaluate(str(policy), args.per_category, args.overrides, out / tag / "refine"), minutes))
        print(rows[-1], flush=True)
    command = command_line("driver.experiments.srr", argv)
    body = "\n".join([
        "## Self-reflective refinement (issue 17)", "",
        f"`{command.strip()}` on {machine()}. Training: sync mode, tasks rt2i 0.5 / srr 0.5, {args.steps} steps "
        f"from checkpoints/shapes-base (configs/default.yaml otherwise). Evaluation: inference-time SRR on "
        f"{args.per_category} held-out shapes-geneval prompts per category (8 text-to-image categories), one image "
        "each, refine.threshold / refine.rounds from the config; the judge only reports. Critiques: what the "
        "written reflections are (shapes.critiques): an edit instruction, a description of shapes, or a bare yes / "
        "no.", "",
        "| policy | one-pass acc. % | after SRR % | fixes % (n) | breaks % (n) | own reward first -> final "
        "| refined % | changed % | critiques: n: instruction / description / yes-no % | train min |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows])
    print(f"wrote {write_section('srr', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
