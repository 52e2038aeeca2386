"""Baseline mode (`trainer.mode=sync`): the pipeline's stages one after another in one process.

This is how single-program trainers (Flow-GRPO) work: sample B groups, score them, compute
advantages, take one optimizer step, repeat. Same stage functions and same prompt/seed stream as the
Ray pipeline, so at max_staleness=0 both compute the same first-step loss; used for correctness
comparison and as the denominator of the pipeline's speed-up (bench P1).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from driver.config import Config
from driver.metrics import MetricsLog, StepRecord, batch_judge_acc, reward_stats
from driver.stages import (GroupStream, LocalReward, Scorer, heldout_metrics, heldout_requests,
                           heldout_samples, load_sources, settings_from)
from grpo.groups import PolicySettings, batch_advantages, draw_heldout, groups_loss, sample_group
from grpo.loading import load_policy, load_prompter, save_policy
from reward_service.report import question_pass_rates
from worlds.load import Sources


@dataclass(kw_only=True)
class RunResult:
    steps: list[StepRecord] = field(default_factory=list)
    before: dict[str, float] | None = None
    after: dict[str, float] | None = None
    trajectories: int = 0
    seconds: float = 0.0
    first_loss: float | None = None


def is_zero_variance(rewards: list[float]) -> bool:
    return max(rewards) - min(rewards) <= 1e-8


def evaluate_local(model, prompter, sources: Sources, settings: PolicySettings, cfg: Config, scorer: Scorer,
                   *, policy_version: int) -> dict[str, float]:
    """Held-out metrics (driver.stages.heldout_metrics) with every batch drawn in this process."""
    samples = []
    for req in heldout_requests(sources.heldout, cfg.eval, policy_version=policy_version):
        world = req.prompts[0].world
        meta, images = draw_heldout(model, prompter, req, settings, judge=sources.judges.get(world))
        results = scorer.score(req.prompts, list(images), key=f"heldout{req.index}")
        samples += heldout_samples(req, meta, results)
    return heldout_metrics(samples, sources.judges)


def train_sync(cfg: Config, *, log: MetricsLog | None = None, model=None, save_to: str | Path | None = None
               ) -> RunResult:
    """The one-process baseline; `save_to`: write the trained policy there as a checkpoint."""
    torch.manual_seed(cfg.run.seed)
    t_start = time.perf_counter()
    settings, sources = settings_from(cfg), load_sources(cfg)
    model = model if model is not None else load_policy(cfg.policy)
    prompter = load_prompter(cfg.policy.checkpoint, model.cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay)
    scorer = Scorer(LocalReward(cfg))
    stream = GroupStream(sources.train, group_size=cfg.data.group_size, base_seed=cfg.run.seed)
    result = RunResult()
    if cfg.eval.enabled:
        result.before = evaluate_local(model, prompter, sources, settings, cfg, scorer, policy_version=0)
    version = 0
    for step in range(cfg.trainer.steps):
        times = {"rollout": 0.0, "reward": 0.0}
        batch, dropped = [], 0
        while len(batch) < cfg.trainer.groups_per_step:
            req = stream.next_request(policy_version=version)
            t0 = time.perf_counter()
            meta, payload, images = sample_group(model, prompter, req, settings,
                                                 judge=sources.judges.get(req.prompt.world))
            t1 = time.perf_counter()
            scored = scorer.score([req.prompt] * len(images), list(images), key=f"group{req.index}")
            rewards = [s.reward for s in scored]
            times["rollout"] += t1 - t0
            times["reward"] += time.perf_counter() - t1
            result.trajectories += len(rewards)
            if cfg.trainer.drop_zero_variance and is_zero_variance(rewards):
                dropped += 1
                continue
            batch.append((payload, rewards, meta, scored))
        t0 = time.perf_counter()
        adv = batch_advantages([b[1] for b in batch], std_scope=cfg.trainer.std_scope)
        loss, stats = groups_loss(model, [b[0] for b in batch], adv.per_group, settings)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.trainer.grad_clip)
        opt.step()
        version += 1
        times["learn"] = time.perf_counter() - t0
        mean, std = reward_stats([b[1] for b in batch])
        rec = StepRecord(step=step, policy_version=version, groups=len(batch), reward_mean=mean, reward_std=std,
                         judge_acc=batch_judge_acc([b[2] for b in batch]),
                         question_pass=question_pass_rates(s.audit for b in batch for s in b[3]),
                         loss=stats["loss"], image_loss=stats["image_loss"],
                         text_loss=stats["text_loss"], staleness_max=0, staleness_mean=0.0,
                         zero_variance_dropped=dropped, stale_dropped=0, image_clip_frac=stats["image_clip_frac"],
                         seconds=times)
        if result.first_loss is None:
            result.first_loss = stats["loss"]
        result.steps.append(rec)
        if log is not None:
            log.add(rec)
    if cfg.eval.enabled:
        result.after = evaluate_local(model, prompter, sources, settings, cfg, scorer, policy_version=version)
    if save_to is not None:
        save_policy(model, cfg.policy, save_to)
    result.seconds = time.perf_counter() - t_start
    return result
