"""Inference-time SRR on a prompt file, gated by the model's own reward:
`python -m driver.refine [config=...] data.heldout.source=prompts.jsonl policy.checkpoint=DIR
[refine.threshold=0.9 refine.rounds=2]`.

For every prompt: draw once (the held-out path: plan at the evaluation temperature, the ODE), score
the image with the run's DVReward (decomposer + verifier, available at inference), and while its
reward is below `refine.threshold` and rounds remain, reflect on it and redraw it as an edit
(grpo.srr.draw_refinements); a refinement replaces the image only when its own reward is higher.
The decisions never consult a judge: a world's judge (the shapes world has one) only reports,
afterwards, the fixes (first pass wrong, final right) and breaks (first pass right, final wrong).
Writes <out>/results.jsonl (one line per prompt) and <out>/summary.json; prints the summary.
"""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from driver.config import Config, ConfigError, EvalConfig, load_command_line
from driver.stages import Scorer, heldout_requests, heldout_selection
from grpo.groups import EvalRequest, PolicySettings, draw_heldout
from grpo.srr import SelfRefineConfig, SRRConfig, draw_refinements
from worlds.base import Judge
from worlds.load import Sources
from worlds.records import PromptRecord


@dataclass(kw_only=True)
class Refined:
    """One prompt's image before and after self-refinement."""
    prompt: PromptRecord
    first: np.ndarray                # (H, W, 3) uint8, the first pass
    first_reward: float              # the model's own DVReward of it
    final: np.ndarray                # what is kept
    final_reward: float
    tried: int = 0                   # refinements drawn
    accepted: int = 0                # of those, kept (own reward higher)
    critiques: list[str] = field(default_factory=list)


def self_refine(model, prompter, prompts: list[PromptRecord], settings: PolicySettings, srr: SRRConfig,
                refine: SelfRefineConfig, scorer: Scorer, *, images_per_prompt: int = 1,
                policy_version: int = 0) -> list[Refined]:
    """Draw, score with the own reward, refine what falls short (see the module docstring). No judge is
    reachable from here: the decisions see only the model and its reward."""
    ev = EvalConfig(prompts_per_category=0, images_per_prompt=images_per_prompt, batch_size=refine.batch_size)
    out: list[Refined] = []
    for req in heldout_requests(prompts, ev, policy_version=policy_version):
        _, images = draw_heldout(model, prompter, req, settings)
        scored = scorer.score(req.prompts, list(images), key=f"first{req.index}")
        out += [Refined(prompt=p, first=img, first_reward=s.reward, final=img, final_reward=s.reward)
                for p, img, s in zip(req.prompts, images, scored)]
    for rnd in range(refine.rounds):
        todo = [r for r in out if r.final_reward < refine.threshold]
        for i in range(0, len(todo), refine.batch_size):
            chunk = todo[i:i + refine.batch_size]
            req = EvalRequest(index=i, prompts=tuple(r.prompt for r in chunk), seed=10_000 * (rnd + 1) + i,
                              policy_version=policy_version)
            meta, images = draw_refinements(model, prompter, req, np.stack([r.final for r in chunk]), settings, srr)
            scored = scorer.score(req.prompts, list(images), key=f"refine{rnd}.{i}")
            for r, img, s, plan in zip(chunk, images, scored, meta.plans):
                r.tried += 1
                r.critiques.append(plan)
                if s.reward > r.final_reward:
                    r.final, r.final_reward, r.accepted = img, s.reward, r.accepted + 1
    return out


def report(results: list[Refined], judges: dict[str, Judge], *, threshold: float) -> dict[str, float]:
    """The run's numbers: own rewards before/after, how many were refined and kept; with a judge, the
    first-pass and final accuracy, fixes (share of first-pass failures made right) and breaks (share of
    first-pass successes made wrong)."""
    out = {"prompts": float(len(results)),
           "reward/first": statistics.fmean(r.first_reward for r in results),
           "reward/final": statistics.fmean(r.final_reward for r in results),
           "refined": sum(r.first_reward < threshold for r in results) / len(results),
           "changed": sum(r.accepted > 0 for r in results) / len(results)}
    judged = [(r, judges[r.prompt.world]) for r in results if r.prompt.world in judges]
    if judged:
        first = [j(r.first[None], r.prompt)[0] for r, j in judged]
        final = [j(r.final[None], r.prompt)[0] for r, j in judged]
        wrong, right = sum(not f for f in first), sum(first)
        fixes = sum(not a and b for a, b in zip(first, final))
        breaks = sum(a and not b for a, b in zip(first, final))
        out.update({"judge/first": right / len(first), "judge/final": sum(final) / len(final),
                    "judge/fixes": fixes / wrong if wrong else 0.0, "judge/breaks": breaks / right if right else 0.0,
                    "judge/fixes_n": float(fixes), "judge/breaks_n": float(breaks)})
    return out


def run(cfg: Config, *, out_dir: Path | None = None, sources: Sources | None = None) -> dict[str, float]:
    """The command: the configured policy, held-out prompts (data.heldout) and reward, in this process
    (`sources`: already loaded ones, e.g. with an instrumented judge)."""
    from driver.stages import LocalReward, load_sources, settings_from
    from grpo.loading import load_policy, load_prompter

    if not cfg.data.heldout.source:
        raise ConfigError("data.heldout.source: name the prompt file (or world) to refine on")
    cfg.srr.validate("srr")
    cfg.refine.validate("refine")
    sources, settings = sources or load_sources(cfg), settings_from(cfg)
    model = load_policy(cfg.policy).eval()
    prompter = load_prompter(cfg.policy.checkpoint, model.cfg)
    prompts = heldout_selection(sources.heldout, cfg.eval.prompts_per_category)
    results = self_refine(model, prompter, prompts, settings, cfg.srr, cfg.refine, Scorer(LocalReward(cfg)),
                          images_per_prompt=cfg.eval.images_per_prompt)
    summary = report(results, sources.judges, threshold=cfg.refine.threshold)
    out_dir = out_dir or Path(cfg.run.out_dir) / cfg.run.name / "refine"
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": r.prompt.id, "prompt": r.prompt.text, "first_reward": r.first_reward,
                         "final_reward": r.final_reward, "tried": r.tried, "accepted": r.accepted,
                         "critiques": r.critiques}) for r in results]
    (out_dir / "results.jsonl").write_text("\n".join(lines) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = load_command_line(argv)
    summary = run(cfg)
    for k, v in summary.items():
        print(f"{k:16s} {v:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
