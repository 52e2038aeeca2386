"""Does the reward see what the judge sees? DVReward's aggregation rules ranked on the policy's own images.

    python -m bench.reward_ranking [--per-family 16] [--seed 0] [--write]

Draws G images per prompt the way training does (think-then-draw, the SDE sampler of configs/default.yaml)
for training-distribution prompts of every shapes family but two_objects (generated with --seed, never
the held-out benchmark, which holds out every two_objects text), has the shapes verifier answer every
question once, and aggregates those same answers under each rule below. Per family and overall:

    pair acc.   same-prompt pairs (judge-correct image, judge-wrong image): P(reward correct > reward
                wrong), a tie counting 1/2 -- what GRPO's group-relative advantage needs
    AUC         reward as a score for the judge's verdict, over all images
    false acc.  share of judge-wrong images whose reward is above 0.5

The judge only measures here; it never enters training. `--write` replaces the marked section of
docs/dvreward.md with the table (with the command and the machine).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import numpy as np

from reward_service.reward import RewardConfig

RULES: dict[str, RewardConfig] = {
    "mean, parents none (method)": RewardConfig(),
    "mean, parents scale (make run)": RewardConfig(parent_rule="scale"),
    "mean, parents zero (DSG)": RewardConfig(parent_rule="zero"),
    "product, parents scale": RewardConfig(parent_rule="scale", semantic="product"),
    "softmin 0.1, parents scale": RewardConfig(parent_rule="scale", semantic="softmin", semantic_temperature=0.1),
    "softmin 0.05, parents scale": RewardConfig(parent_rule="scale", semantic="softmin", semantic_temperature=0.05),
    "min, parents scale": RewardConfig(parent_rule="scale", semantic="min"),
    "mean, scale, spatial/count x3": RewardConfig(parent_rule="scale", category_weights={"spatial": 3.0,
                                                                                         "count": 3.0}),
}


def auc(scores: list[float], positive: list[bool]) -> float:
    """P(score of a positive > score of a negative), ties 1/2 (Mann-Whitney)."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return float("nan")
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def pair_accuracy(groups: list[tuple[list[float], list[bool]]]) -> float:
    """Over same-prompt (correct, wrong) pairs: P(reward correct > reward wrong), ties 1/2."""
    wins = [(c > w) + 0.5 * (c == w) for rewards, ok in groups
            for c in [r for r, o in zip(rewards, ok) if o] for w in [r for r, o in zip(rewards, ok) if not o]]
    return float(np.mean(wins)) if wins else float("nan")


def measure(per_family: int, seed: int) -> tuple[dict, dict]:
    """{family: [(prompt, judged, per-rule rewards)]} from the shipped policy's training-style groups."""
    import torch

    from driver.config import load
    from driver.stages import settings_from
    from grpo.groups import GroupRequest, sample_group
    from grpo.loading import load_policy, load_prompter
    from reward_service.backends.shapes_decomposer import ShapesDecomposer
    from reward_service.backends.shapes_verifier import ShapesVerifier
    from reward_service.backends import DecomposeRequest
    from shapes.plugin import TEXT_TO_IMAGE, ShapesJudge, ShapesWorld

    # two_objects: shapes-geneval holds out every text of the family, so it has no training prompt to rank on
    TRAINABLE = [f for f in TEXT_TO_IMAGE if f != "two_objects"]
    torch.set_num_threads(2)
    cfg = load(["trainer.mode=sync"])
    model, settings = load_policy(cfg.policy).eval(), settings_from(cfg)
    prompter, judge = load_prompter(cfg.policy.checkpoint, model.cfg), ShapesJudge()
    decomposer, verifier = ShapesDecomposer(), ShapesVerifier()
    out: dict[str, list] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for f_i, family in enumerate(TRAINABLE):
        stream = ShapesWorld().train_source({"families": [family]}, seed=seed * 100 + f_i)
        for k in range(per_family):
            prompt = stream.next()
            req = GroupRequest(index=k, prompt=prompt, group_size=cfg.data.group_size, seed=seed * 10_007 + k,
                               policy_version=0)
            _, _, images = sample_group(model, prompter, req, settings)
            qs = decomposer.decompose_batch([DecomposeRequest(prompt=prompt.text, meaning=prompt.meaning)])[0]
            answers = verifier.answer_batch([(img, qs) for img in images])
            judged = judge(images, prompt)
            rewards = {name: [rule.aggregate(qs, a).reward for a in answers] for name, rule in RULES.items()}
            out[family].append((judged, rewards))
            counts[family] += len(images)
        print(f"{family}: {per_family} prompts x {cfg.data.group_size} images", file=sys.stderr, flush=True)
    return out, counts


def table(data: dict) -> str:
    families = list(data)
    head = "| rule | " + " | ".join(families) + " | all (pair acc. / AUC / false acc.) |"
    rows = [head, "|" + "---|" * (len(families) + 2)]
    for name in RULES:
        cells = []
        for fam in families:
            cells.append(f"{100 * pair_accuracy([(r[name], j) for j, r in data[fam]]):.0f}")
        groups = [(r[name], j) for fam in families for j, r in data[fam]]
        flat_r = [x for rs, _ in groups for x in rs]
        flat_j = [x for _, js in groups for x in js]
        false = [r > 0.5 for r, j in zip(flat_r, flat_j) if not j]
        cells.append(f"{100 * pair_accuracy(groups):.1f} / {auc(flat_r, flat_j):.3f} / {100 * np.mean(false):.1f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-family", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true", help="write the table into docs/dvreward.md")
    args = ap.parse_args(argv)
    data, counts = measure(args.per_family, args.seed)
    text = table(data)
    print(text)
    if args.write:
        from driver.experiments.results import command_line, machine, write_section
        from driver.config import REPO_ROOT
        n = sum(counts.values())
        judged_ok = sum(sum(j) for fam in data.values() for j, _ in fam)
        body = "\n".join([
            "### Measured: same-prompt ranking per family (bench/reward_ranking.py)", "",
            f"`{command_line('bench.reward_ranking', argv)}` on {machine()}: "
            f"{n} images of the shipped policy (training-style groups of {n // max(1, sum(len(v) for v in data.values()))}, "
            f"{args.per_family} generated prompts per family, none held out), {judged_ok} judged correct. "
            "Cells: same-prompt pair accuracy % per family; last column over all families: pair accuracy % / "
            "AUC / share of judge-wrong images above reward 0.5.", "", text])
        write_section("reward-ranking", body, REPO_ROOT / "docs" / "dvreward.md")
        print("wrote docs/dvreward.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
