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
    judge_acc: float                 # strict judge accuracy of the training batch's images
    loss: float
    image_loss: float
    text_loss: float
    staleness_max: int               # learner version - group's policy version, over the batch
    staleness_mean: float
    zero_variance_dropped: int       # groups dropped (and refilled) since the previous step
    stale_dropped: int               # groups too far behind (max_staleness) since the previous step
    image_clip_frac: float = 0.0     # share of trained SDE steps whose ratio left the PPO clip range
    seconds: dict[str, float] = field(default_factory=dict)   # stage -> seconds (wall, this step)

    def line(self) -> str:
        times = " ".join(f"{k}={v:.1f}s" for k, v in self.seconds.items())
        return (f"step {self.step:4d} v{self.policy_version} | reward {self.reward_mean:.3f}±{self.reward_std:.3f} "
                f"judge {self.judge_acc:5.1%} | loss {self.loss:+.4f} clip {self.image_clip_frac:.0%} "
                f"| stale max {self.staleness_max} "
                f"mean {self.staleness_mean:.2f} | dropped zero-var {self.zero_variance_dropped} "
                f"stale {self.stale_dropped} | {times}")


def reward_stats(rewards: list[list[float]]) -> tuple[float, float]:
    flat = [r for g in rewards for r in g]
    return statistics.fmean(flat), (statistics.pstdev(flat) if len(flat) > 1 else 0.0)


class MetricsLog:
    """Appends step records to <run>/metrics.jsonl and prints their lines."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.path.write_text("")

    def add(self, rec: StepRecord) -> None:
        print(rec.line(), flush=True)
        with self.path.open("a") as f:
            f.write(json.dumps(asdict(rec)) + "\n")


def before_after_table(before: dict[str, float], after: dict[str, float]) -> str:
    """Held-out accuracy per category, before and after training."""
    rows = [f"{'category':16s} {'before':>7s} {'after':>7s} {'change':>7s}"]
    for k in before:
        b, a = before[k], after.get(k, float("nan"))
        rows.append(f"{k:16s} {b:7.1%} {a:7.1%} {a - b:+7.1%}")
    return "\n".join(rows)
