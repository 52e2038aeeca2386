"""What a run prints and records: one line per optimizer step, a before/after table at the end."""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(kw_only=True)
class StepRecord:
    """One optimizer step, as printed and written to metrics.jsonl."""
    step: int
    policy_version: int              # the learner's version after this step
    groups: int
    reward_mean: float
    reward_std: float
    judge_acc: float | None          # the world's strict judge on the batch's images (None: no judge)
    loss: float
    image_loss: float
    text_loss: float
    staleness_max: int               # learner version - group's policy version, over the batch
    staleness_mean: float
    zero_variance_dropped: int       # groups dropped (and refilled) since the previous step
    stale_dropped: int               # groups too far behind (max_staleness) since the previous step
    image_clip_frac: float = 0.0     # share of trained SDE steps whose ratio left the PPO clip range
    question_pass: dict[str, float] = field(default_factory=dict)   # DVReward question category -> pass rate
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)  # per task: groups, reward (SRR: initial
                                                                      # reward, improved share, rectified)
    srr_skipped: int = 0             # SRR sub-batches dropped by the skip rule since the previous step
    grad_norm: float = float("nan")  # global gradient norm before clipping
    policy: dict[str, float] = field(default_factory=dict)   # grpo.groups.BatchStats of the step (ratio ranges,
                                                             # clip fractions, KLs, plan entropy)
    seconds: dict[str, float] = field(default_factory=dict)   # stage -> seconds (wall, this step)

    def line(self) -> str:
        times = " ".join(f"{k}={v:.1f}s" for k, v in self.seconds.items())
        judge = f" judge {self.judge_acc:5.1%}" if self.judge_acc is not None else ""
        passes = " ".join(f"{k[:5]} {v:.0%}" for k, v in self.question_pass.items() if k != "all")
        srr = self.tasks.get("srr")
        srr = (f" | srr {srr['groups']:.0f}g r {srr['reward']:.3f} (initial {srr['initial_reward']:.3f}) "
               f"improved {srr['improved']:.0%} rectified {srr['rectified']:.0f} skipped {self.srr_skipped}"
               if srr else "")
        return (f"step {self.step:4d} v{self.policy_version} | reward {self.reward_mean:.3f}±{self.reward_std:.3f}"
                f"{judge} | pass {passes}{srr} | {self.policy_line()} "
                f"| stale max {self.staleness_max} "
                f"mean {self.staleness_mean:.2f} | dropped zero-var {self.zero_variance_dropped} "
                f"stale {self.stale_dropped} | {times}")


    def policy_line(self) -> str:
        """What moves in the loss (on-policy it is ~0 by construction): ratio ranges, clips, KL, grad norm."""
        p = self.policy
        if not p:
            return f"loss {self.loss:+.4f}"
        text = (f" txt [{p['text_ratio_min']:.4f}, {p['text_ratio_max']:.4f}]"
                if p["text_ratio_min"] == p["text_ratio_min"] else "")
        kl = f" kl {p['image_kl']:.2e}/{p['text_kl']:.2e}" if p["image_kl"] or p["text_kl"] else ""
        ent = f" ent {p['think_entropy']:.2f}" if p["think_entropy"] == p["think_entropy"] else ""
        return (f"ratio img [{p['image_ratio_min']:.6f}, {p['image_ratio_max']:.6f}]{text} "
                f"clip {p['image_clip_frac']:.0%}/{p['text_clip_frac']:.0%}{kl} gnorm {self.grad_norm:.3g}{ent}")


def batch_judge_acc(metas) -> float | None:
    """The judge's accuracy over the images of a batch's groups (GroupMeta.judged); None without a judge."""
    judged = [ok for m in metas if m.judged is not None for ok in m.judged]
    return sum(judged) / len(judged) if judged else None


def task_metrics(batch) -> dict[str, dict[str, float]]:
    """Per task of a batch of groups (driver.lanes.Ready): groups and mean DVReward; SRR also the mean
    reward of the initial images, the share of refinements that beat theirs, and how many were rectified."""
    from driver.srr import rectify
    out: dict[str, dict[str, float]] = {}
    for task in sorted({g.task for g in batch}):
        groups = [g for g in batch if g.task == task]
        raw = [r for g in groups for r in g.raw_rewards()]
        m = {"groups": float(len(groups)), "reward": statistics.fmean(raw)}
        if task == "srr":
            fixed = [rectify(g.episode, g.raw_rewards()) for g in groups]
            m.update(initial_reward=statistics.fmean(g.episode.initial_reward for g in groups),
                     improved=sum(f.improved for f in fixed) / len(raw), rectified=float(sum(f.rectified for f in fixed)))
        out[task] = m
    return out


def reward_stats(rewards: list[list[float]]) -> tuple[float, float]:
    flat = [r for g in rewards for r in g]
    return statistics.fmean(flat), (statistics.pstdev(flat) if len(flat) > 1 else 0.0)


def before_after_table(before: dict[str, float], after: dict[str, float]) -> str:
    """Held-out metrics (driver.stages.heldout_metrics: rewards, question pass rates, the judge's
    accuracies), before and after training; rates and rewards alike as percentages."""
    width = max(len(k) for k in before)
    rows = [f"{'held-out metric':{width}s} {'before':>7s} {'after':>7s} {'change':>7s}"]
    for k in before:
        b, a = before[k], after.get(k, float("nan"))
        rows.append(f"{k:{width}s} {b:7.1%} {a:7.1%} {a - b:+7.1%}")
    return "\n".join(rows)
