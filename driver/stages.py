"""The driver's side of the stages, shared by sync mode and the Ray pipeline (no Ray here).

    load_sources      data.train / data.heldout -> the training stream, held-out prompts, judges
    GroupStream       the training requests in stream order (prompt, seed, expected policy version)
    heldout_requests  the held-out evaluation as fixed batches (seeded per batch: before/after paired)
    Scorer            DVReward for the driver: a prompt's question set once, then rewards with audits,
                      over any reward backend with `decompose_many` / `score_many` (LocalReward here,
                      actors.reward_workers.RewardService on Ray)
    heldout_metrics   mean DVReward, per-category question pass rates, the judge's summary if any

The policy-side work units (sampling, refinement, held-out drawing, the loss) are grpo.groups.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from driver.config import REPO_ROOT, Config, ConfigError, EvalConfig
from grpo.groups import EvalRequest, GroupRequest, PolicySettings, policy_settings
from reward_service.backends import BackendSpec, DecomposeRequest
from reward_service.report import question_pass_rates
from reward_service.scoring import ScoreRequest, ScoreResult
from worlds.base import Judge, PromptSource
from worlds.load import Sources, build_sources
from worlds.records import PromptRecord


def settings_from(cfg: Config) -> PolicySettings:
    ev = cfg.eval
    return policy_settings(cfg.policy, cfg.trainer.loss, eval_steps=ev.num_steps, eval_cfg_scale=ev.cfg_text_scale,
                           eval_think_temperature=ev.think_temperature, eval_think=ev.think)


def resolve_file(path: str, key: str) -> Path:
    """A file named in the config, as given or relative to the repository (a Ray job's working
    directory is not the repository)."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{key}={path!r}: no such file (looked in {Path.cwd()} and {REPO_ROOT})")


def load_sources(cfg: Config) -> Sources:
    """The run's prompt sources; a prompt that cannot fit the model's context with its plan and image
    is a bad row (data.on_bad_row). Reads the checkpoint's config and tokenizer only (no weights)."""
    from grpo.loading import load_prompter
    from umm.checkpoint import read_config

    model_cfg = read_config(cfg.policy.checkpoint)
    prompter = load_prompter(cfg.policy.checkpoint, model_cfg)
    think = cfg.policy.think.enabled
    side = cfg.policy.canvas_size // model_cfg.latent_downsample
    room = model_cfg.llm.max_position_embeddings - side * side - 2 - (cfg.policy.think.max_new_tokens if think else 0)
    return build_sources(cfg.data, seed=cfg.run.seed, resolve=resolve_file, max_tokens=max(room, 1),
                         count_tokens=lambda text: prompter.length(prompter.draw(text, think=think)))


class GroupStream:
    """Training requests in stream order: the source's next prompt; the group's seed from (run seed, index).

    Exact resume: the source's state is noted before each request is drawn, so `state_at(i)` can restart
    the stream at request i (the first group not yet trained, while later ones are in flight)."""

    def __init__(self, source: PromptSource, *, group_size: int, base_seed: int) -> None:
        self.source, self.group_size, self.base_seed = source, group_size, base_seed
        self.index = 0
        self.snapshots: dict[int, dict] = {}

    def next_request(self, *, policy_version: int) -> GroupRequest:
        i = self.index
        self.snapshots[i] = self.source.state()
        self.index += 1
        return GroupRequest(index=i, prompt=self.source.next(), group_size=self.group_size,
                            seed=self.base_seed * 1_000_003 + i, policy_version=policy_version)

    def state_at(self, index: int) -> dict:
        """Where to restart so that request `index` comes next (it must not have been forgotten)."""
        if index == self.index:
            return {"index": index, "source": self.source.state()}
        return {"index": index, "source": self.snapshots[index]}

    def forget_before(self, index: int) -> None:
        for i in [i for i in self.snapshots if i < index]:
            del self.snapshots[i]

    def restore(self, state: dict) -> None:
        self.index = int(state["index"])
        self.source.restore(state["source"])
        self.snapshots.clear()


def heldout_selection(prompts: Sequence[PromptRecord], per_category: int) -> list[PromptRecord]:
    """The first `per_category` prompts of each category, in their order (0 = all)."""
    if per_category == 0:
        return list(prompts)
    seen: dict[str, int] = defaultdict(int)
    out = []
    for p in prompts:
        if seen[p.category] < per_category:
            seen[p.category] += 1
            out.append(p)
    return out


def heldout_requests(prompts: Sequence[PromptRecord], ev: EvalConfig, *, policy_version: int) -> list[EvalRequest]:
    """Image k of every selected prompt, in batches of `ev.batch_size` (each batch one world), each
    batch with its own fixed seed: whoever draws it, before and after training draw the same noise."""
    chosen = heldout_selection(prompts, ev.prompts_per_category)
    by_world: dict[str, list[PromptRecord]] = defaultdict(list)
    for p in chosen:
        by_world[p.world].append(p)
    out = []
    for k in range(ev.images_per_prompt):
        for group in by_world.values():
            for i in range(0, len(group), ev.batch_size):
                out.append(EvalRequest(index=len(out), prompts=tuple(group[i:i + ev.batch_size]),
                                       seed=1000 * k + i, policy_version=policy_version))
    return out


def check_finite(batch) -> None:
    """Refuse a non-finite reward before advantages are computed, naming the sample and its prompt (a NaN
    would silently poison every weight it touches; advantages of finite rewards are finite)."""
    import math
    for g in batch:
        for k, r in enumerate(g.rewards()):
            if not math.isfinite(r):
                raise ValueError(f"{g.task} group {g.index} sample {k} (prompt {g.prompt.id} {g.prompt.text!r}): "
                                 f"reward {r!r} is not finite")


def shuffled_advantages(per_group: list[list[float]], *, seed: int) -> list[list[float]]:
    """The control of an experiment (trainer.shuffle_advantages): the batch's advantages permuted across
    all its trajectories (seeded), same group shapes. Whatever a run learns with this is not the reward's
    doing: the same updates' size and noise, no signal."""
    import random

    flat = [a for g in per_group for a in g]
    random.Random(seed).shuffle(flat)
    out, k = [], 0
    for g in per_group:
        out.append(flat[k:k + len(g)])
        k += len(g)
    return out


class LocalReward:
    """DVReward in this process (sync mode): the same DecomposerWorker and VerifierWorker classes the
    Ray pools run, called directly, behind the RewardService's two methods."""

    def __init__(self, cfg: Config) -> None:
        from reward_service.scoring import DecomposerWorker, VerifierWorker
        r = cfg.reward
        self.decomposer = DecomposerWorker(BackendSpec(name=r.decomposer.name, options=dict(r.decomposer.options)),
                                           cache_path=r.cache or None)
        self.verifier = VerifierWorker(BackendSpec(name=r.verifier.name, options=dict(r.verifier.options)),
                                       reward=r.rule())

    def decompose_many(self, requests: list[DecomposeRequest]):
        return list(self.decomposer.decompose(requests).question_sets)

    def score_many(self, items: list[ScoreRequest]) -> list[ScoreResult]:
        return self.verifier.score(items)


class Scorer:
    """Rewards for the driver: each prompt decomposed once (question sets kept by prompt id), then
    every image scored with its audit record. `images` may be arrays or object-store refs."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.sets: dict[str, Any] = {}

    def question_sets(self, prompts: Sequence[PromptRecord]) -> list[Any]:
        todo = {p.id: p for p in prompts if p.id not in self.sets}
        if todo:
            made = self.service.decompose_many([DecomposeRequest(prompt=p.text, meaning=p.meaning)
                                                for p in todo.values()])
            self.sets.update(zip(todo, made))
        return [self.sets[p.id] for p in prompts]

    def score(self, prompts: Sequence[PromptRecord], images: Sequence[Any], *, key: str) -> list[ScoreResult]:
        """One result per (prompt, image) pair, in order; `key` prefixes each sample's name in errors."""
        sets = self.question_sets(prompts)
        items = [ScoreRequest(key=f"{key}/sample{k}", image=img if not isinstance(img, np.ndarray)
                              else np.ascontiguousarray(img), question_set=qs)
                 for k, (img, qs) in enumerate(zip(images, sets))]
        return self.service.score_many(items)


@dataclass(kw_only=True)
class HeldoutSample:
    prompt: PromptRecord
    result: ScoreResult
    judged: bool | None
    plan: str


def heldout_samples(req: EvalRequest, meta, results: Sequence[ScoreResult]) -> list[HeldoutSample]:
    """One held-out batch's prompts with their scored images, judge verdicts (None without) and plans."""
    judged = meta.judged if meta.judged is not None else (None,) * len(results)
    return [HeldoutSample(prompt=p, result=r, judged=j, plan=plan)
            for p, r, j, plan in zip(req.prompts, results, judged, meta.plans, strict=True)]


def heldout_metrics(samples: Sequence[HeldoutSample], judges: dict[str, Judge]) -> dict[str, float]:
    """reward/mean and reward/<prompt category>; pass/<question category> (reward_service.report); and
    judge/<...> from the world's judge summary where the prompts have one."""
    out: dict[str, float] = {"reward/mean": float(np.mean([s.result.reward for s in samples]))}
    per_cat: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        if s.prompt.category:
            per_cat[s.prompt.category].append(s.result.reward)
    out.update({f"reward/{c}": float(np.mean(v)) for c, v in per_cat.items()})
    out.update({f"pass/{c}": v for c, v in question_pass_rates(s.result.audit for s in samples).items()})
    for world, judge in judges.items():
        judged = [s for s in samples if s.prompt.world == world and s.judged is not None]
        if judged:
            out.update({f"judge/{k}": v for k, v in judge.summary((s.prompt.category, s.judged) for s in judged).items()})
        if judged and callable(getattr(judge, "plan_is_right", None)) and any(s.plan for s in judged):
            out.update(plan_metrics(judged, judge))
    return out


def plan_metrics(samples: Sequence[HeldoutSample], judge: Judge) -> dict[str, float]:
    """Where failures come from, per category: plan/<cat> = share of plans that state the request;
    follows/<cat> = share judged correct among the images drawn after a right plan (the drawing's part)."""
    out: dict[str, float] = {}
    by_cat: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for s in samples:
        by_cat[s.prompt.category].append((judge.plan_is_right(s.plan, s.prompt), bool(s.judged)))
    for cat, pairs in by_cat.items():
        out[f"plan/{cat}"] = sum(p for p, _ in pairs) / len(pairs)
        right = [ok for p, ok in pairs if p]
        if right:
            out[f"follows/{cat}"] = sum(right) / len(right)
    return out
