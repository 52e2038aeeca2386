"""Everything a run records, per optimizer step, under runs/<name>/:

    metrics.jsonl           one StepRecord per line (and the step line on stdout)
    tensorboard/            scalars (reward, per-category question pass rates, per-task numbers, ratio
                            ranges, clip fractions, KLs, grad norm, plan entropy, staleness, drops, stage
                            times) and, every `log.images_every` steps, an image grid with each group's
                            prompt, plan and question answers
    trajectories/step-000012.parquet   every trained trajectory: prompt, plan or critique, questions and
                            scores, reward (raw and trained), advantage, policy version, task, image path
    images/step-000012/     the step's images as PNG (every `log.images_every` steps)

Files are written whole (tmp + rename). On resume from a checkpoint after k steps (steps 0 .. k-1 done),
whatever steps k and later recorded goes, so a resumed run's records equal an uninterrupted run's (no
trajectory twice, none missing).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from driver.metrics import StepRecord


@dataclass
class LogConfig:
    tensorboard: bool = True         # runs/<name>/tensorboard: scalars, and image grids every images_every steps
    parquet: bool = True             # runs/<name>/trajectories/step-*.parquet: every trained trajectory
    images_every: int = 10           # every N steps the batch's images are saved (PNG) and shown; 0 = never


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


class RunLog:
    """The run's records (see the module docstring). `resume_steps`: the steps the resumed checkpoint had
    done; what later steps recorded is dropped."""

    def __init__(self, out: Path, cfg: LogConfig, *, resume_steps: int | None = None) -> None:
        self.out, self.cfg = Path(out), cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics = self.out / "metrics.jsonl"
        self.parquet = self.out / "trajectories"
        self.images = self.out / "images"
        if resume_steps is None:
            self.metrics.write_text("")
        else:
            self._truncate(resume_steps)
        self.tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=resume_steps)

    def _truncate(self, steps_done: int) -> None:
        """Keep what steps 0 .. steps_done - 1 recorded (a resumed run redoes the rest)."""
        kept = [line for line in (self.metrics.read_text().splitlines() if self.metrics.exists() else [])
                if line and json.loads(line)["step"] < steps_done]
        _atomic(self.metrics, lambda p: p.write_text("".join(line + "\n" for line in kept)))
        for f in list(self.parquet.glob("step-*.parquet")) + list(self.images.glob("step-*")):
            if int(f.name.split("-")[1].split(".")[0]) >= steps_done:
                if f.is_dir():
                    for g in f.iterdir():
                        g.unlink()
                    f.rmdir()
                else:
                    f.unlink()

    def step(self, rec: StepRecord, batch, advantages: list[list[float]], fetch=lambda images: images) -> None:
        """Record one optimizer step: `batch` the trained groups (driver.lanes.Ready), `advantages` theirs,
        `fetch(images)` turns a group's images (arrays, or object-store refs) into arrays."""
        print(rec.line(), flush=True)
        with self.metrics.open("a") as f:
            f.write(json.dumps(asdict(rec)) + "\n")
        shown = self.cfg.images_every > 0 and rec.step % self.cfg.images_every == 0
        paths = self._save_images(rec.step, batch, fetch) if shown else {}
        if self.cfg.parquet:
            self._trajectories(rec.step, batch, advantages, paths)
        if self.tb is not None:
            self._scalars(rec)
            if shown:
                self._grid(rec.step, batch, paths)
            self.tb.flush()

    def _save_images(self, step: int, batch, fetch) -> dict[tuple[str, int, int], Path]:
        from PIL import Image
        folder = self.images / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for g in batch:
            for k, img in enumerate(fetch(g.images)):
                path = folder / f"{g.task}-{g.index}-{k}.png"
                _atomic(path, lambda p: Image.fromarray(np.asarray(img)).save(p, format="PNG"))
                paths[(g.task, g.index, k)] = path
        return paths

    def _trajectories(self, step: int, batch, advantages, paths) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = []
        for g, adv in zip(batch, advantages):
            scores, trained = g.scores.result(), g.rewards()
            for k, (s, r, a) in enumerate(zip(scores, trained, adv)):
                rows.append({
                    "step": step, "trajectory_id": f"{g.task}:{g.index}:{k}", "task": g.task, "group": g.index,
                    "sample": k, "prompt_id": g.prompt.id, "prompt": g.prompt.text, "category": g.prompt.category,
                    "text": g.meta.plans[k] if k < len(g.meta.plans) else "",
                    "questions": [{"id": q.id, "text": q.text, "kind": q.kind, "category": q.category,
                                   "score": q.score, "effective": q.effective} for q in s.audit.rows],
                    "reward": s.reward, "trained_reward": r, "advantage": a, "policy_version": g.policy_version,
                    "judged": None if g.meta.judged is None else bool(g.meta.judged[k]),
                    "image_path": str(paths.get((g.task, g.index, k), "")),
                })
        self.parquet.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(rows)
        _atomic(self.parquet / f"step-{step:06d}.parquet", lambda p: pq.write_table(table, p))

    def _scalars(self, rec: StepRecord) -> None:
        add = lambda tag, v: v is not None and v == v and self.tb.add_scalar(tag, v, rec.step)  # noqa: E731
        add("reward/mean", rec.reward_mean)
        add("reward/std", rec.reward_std)
        add("judge/acc", rec.judge_acc)
        for k, v in rec.question_pass.items():
            add(f"pass/{k}", v)
        for task, m in rec.tasks.items():
            for k, v in m.items():
                add(f"task/{task}/{k}", v)
        for k, v in rec.policy.items():
            add(f"policy/{k}", v)
        add("policy/grad_norm", rec.grad_norm)
        add("policy/version", rec.policy_version)
        add("staleness/max", rec.staleness_max)
        add("staleness/mean", rec.staleness_mean)
        add("drops/zero_variance", rec.zero_variance_dropped)
        add("drops/stale", rec.stale_dropped)
        add("drops/srr_skipped", rec.srr_skipped)
        for k, v in rec.seconds.items():
            add(f"timing/{k}", v)

    def _grid(self, step: int, batch, paths) -> None:
        """One image per group (its first sample) and, as text, its prompt, plan and every answer."""
        from PIL import Image
        firsts = [paths[(g.task, g.index, 0)] for g in batch if (g.task, g.index, 0) in paths]
        if not firsts:
            return
        imgs = [np.asarray(Image.open(p).convert("RGB")) for p in firsts]
        h, w = imgs[0].shape[:2]
        grid = np.full((h, (w + 2) * len(imgs), 3), 255, np.uint8)
        for i, img in enumerate(imgs):
            grid[:, i * (w + 2):i * (w + 2) + w] = img
        self.tb.add_image("samples/grid", grid, step, dataformats="HWC")
        lines = ["| group | prompt | plan | answers (score) |", "|---|---|---|---|"]
        for g in batch:
            answers = "; ".join(f"{q.text} {q.score:.2f}" for q in g.scores.result()[0].audit.rows)
            lines.append(f"| {g.task}:{g.index} | {g.prompt.text} | {g.meta.plans[0] if g.meta.plans else ''} "
                         f"| {answers} |")
        self.tb.add_text("samples/text", "\n".join(lines), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
