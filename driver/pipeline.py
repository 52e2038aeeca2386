"""The streaming trainer on Ray (`trainer.mode=pipeline`). The whole dataflow is in `Pipeline.run`:

    lanes (driver.lanes), one per task:
      RT2I  GroupStream ─► RolloutWorker ×N ──meta──► driver      (index, version, plans, judge verdicts)
      SRR   episodes   ─► RefineWorker ×M  (candidates ─► scored ─► initial picked ─► reflect)
                          │ payload ref ─────────────────────┐   (tokens, latents, log-probs)
                          └─ images ref ──► RewardService ──► driver (rewards + audits: small)
    driver: each lane's quota of groups, in stream order ─► advantages ─► LearnerWorker ×W (ZeRO-3),
            each pulls its shard's payload refs from the object store ─► step ─► weights gathered
            bucket by bucket ─► broadcast on the weight group ─► every live rollout and refine actor
            (version + checksum checked)

The driver moves refs and small records only. Every rollout slot is kept busy as long as the
staleness bound allows: a group sampled at policy version v may be trained on at learner version L
only if L - v <= max_staleness (0 = strictly on-policy); older ones are dropped and counted.
Batches are formed in prompt-stream order, so with max_staleness=0 a step sees exactly the groups
the sync baseline sees (same prompts, same seeds, same weights).

Operations: a replica that dies loses no work (driver.lanes re-queues it) and rejoins once Ray has
restarted it (driver.replicas); a learner that dies stops the run with an error that names the last
checkpoint to resume from; checkpoints every run.checkpoint_every steps and at exit (driver.checkpoint);
a resumed run continues at the next step with the same prompts and seeds.
"""
from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from driver.checkpoint import DRIVER, Checkpointer, read_json
from driver.config import Config
from driver.lanes import Counters, Lane, Ready, RT2ILane, SRRLane
from driver.metrics import StepRecord, batch_judge_acc, reward_stats, task_metrics
from driver.replicas import ReplicaTimeout, Replicas, Slot
from driver.runlog import RunLog
from driver.srr import SRR_SEED_OFFSET, TaskMix
from driver.stages import (Scorer, heldout_metrics, heldout_requests, heldout_samples, load_sources, settings_from,
                           check_finite, shuffled_advantages)
from driver.sync import RunResult
from driver.telemetry import RayMetrics
from grpo.groups import BatchStats, batch_advantages
from grpo.loading import PolicyFactory
from reward_service.report import question_pass_rates

BATCH_STATS = {f.name for f in fields(BatchStats)}


class LearnerFailed(RuntimeError):
    """A learner rank died or failed: the run stops; the message names the checkpoint to resume from."""


@dataclass(kw_only=True)
class Update:
    """One optimizer step in flight: its refs, its batch, and how stale each group was when batched."""
    step: list                        # learner ranks' train refs
    send: list                        # learner ranks' broadcast refs
    receive: list                     # the receiving replicas' refs
    receivers: list[Slot]
    batch: list[Ready]
    advantages: list[list[float]]
    staleness: list[int]              # learner version - group's sampling version, per group
    started: float

    @property
    def refs(self) -> list:
        return self.step + self.send + self.receive


class Pipeline:
    """Owns the pools for one run; `run()` trains and returns the same RunResult as sync mode."""

    def __init__(self, cfg: Config) -> None:
        import ray

        from actors.learner import LearnerSpec
        from actors.policy_learner import PolicyLearner
        from actors.pool import PoolConfig
        from actors.refine import RefineWorker
        from actors.reward_workers import RewardService, RewardServiceConfig
        from actors.rollout import RolloutSpec, RolloutWorker
        from reward_service.backends import BackendSpec

        from driver.cluster import check_resources, learner_placement
        self.cfg, self.ray = cfg, ray
        check_resources(cfg, ray.cluster_resources())
        self.settings, self.sources = settings_from(cfg), load_sources(cfg)
        p, L = cfg.pools, cfg.pools.learner
        spec = RolloutSpec(policy=cfg.policy, settings=self.settings, srr=cfg.srr, judges=self.sources.judges,
                           bucket_bytes=int(L.bucket_mb * (1 << 20)), sync_timeout_s=L.sync_timeout_s)
        # the learner ranks first, all or nothing: nothing else is started if they cannot be placed
        self.learner_group, learner_opts = learner_placement(ray, L)
        tag = f"{cfg.run.name}-{uuid.uuid4().hex[:4]}"       # actor names read well on the dashboard, unique per run
        slots = [Slot(actor=ray.remote(RolloutWorker).options(name=f"{tag}/rollout-{i}", **_actor_options(p.rollout))
                      .remote(spec, i), index=i, kind="rollout") for i in range(p.rollout.num)]
        # the refinement pool (SRR): policy replicas that take every weight broadcast like the rollout actors
        slots += [Slot(actor=ray.remote(RefineWorker).options(name=f"{tag}/refine-{i}", **_actor_options(p.refine))
                       .remote(spec, i), index=i, kind="refine") for i in range(p.refine.num)]
        r = cfg.reward
        self.reward = RewardService(RewardServiceConfig(
            decomposer=BackendSpec(name=r.decomposer.name, options=dict(r.decomposer.options)),
            verifier=BackendSpec(name=r.verifier.name, options=dict(r.verifier.options)),
            reward=r.rule(), cache_path=r.cache or None,
            decomposer_pool=PoolConfig(num_actors=p.decomposer.num, num_cpus=p.decomposer.num_cpus,
                                       num_gpus=p.decomposer.num_gpus, env=dict(p.decomposer.env)),
            verifier_pool=PoolConfig(num_actors=p.verifier.num, num_cpus=p.verifier.num_cpus,
                                     num_gpus=p.verifier.num_gpus, env=dict(p.verifier.env))))
        self.learners = [ray.remote(PolicyLearner).options(name=f"{tag}/learner-{r_}", **learner_opts[r_]).remote(
            LearnerSpec(rank=r_, world_size=L.world_size, model_factory=PolicyFactory(cfg.policy),
                        lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay, grad_clip=cfg.trainer.grad_clip,
                        seed=cfg.run.seed, zero_stage=L.zero_stage, bucket_bytes=int(L.bucket_mb * (1 << 20)),
                        max_reuse_distance=None if L.max_reuse_distance == -1 else L.max_reuse_distance,
                        timeout_s=L.timeout_s))
            for r_ in range(L.world_size)]
        # DeepSpeed's group meets on learner rank 0's node (wherever Ray placed it)
        addr, port = self._learners(self.learners[0].rendezvous.remote(), "learner rank 0's rendezvous address")
        self._learners([a.setup.remote(addr, L.master_port or port) for a in self.learners],
                       "the learner ranks' setup (DeepSpeed init, building the policy)")
        self.reward.wait_ready()
        self.replicas = Replicas(ray, self.learners, slots, lane=L.weight_lane, sync_timeout_s=L.sync_timeout_s,
                                 sync_port=L.sync_port)
        self.weight_lane = self.replicas.join()
        self.version = 0
        self.scoring = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")   # one caller of the service
        self.scorer = Scorer(self.reward)
        self.last_checkpoint: Path | None = None
        self.metrics = RayMetrics(cfg.run.name)

    @property
    def slots(self) -> list[Slot]:
        return [s for s in self.replicas.slots if s.kind == "rollout"]

    @property
    def refine_slots(self) -> list[Slot]:
        return [s for s in self.replicas.slots if s.kind == "refine"]

    @property
    def refiners(self) -> list:
        return [s.actor for s in self.refine_slots]

    def _learners(self, refs, what: str):
        """ray.get on learner calls with the learners' timeout; a dead or failed learner stops the run."""
        try:
            return self.ray.get(refs, timeout=self.cfg.pools.learner.timeout_s)
        except self.ray.exceptions.GetTimeoutError:
            raise LearnerFailed(f"{what}: no answer within pools.learner.timeout_s={self.cfg.pools.learner.timeout_s:g} s"
                                f"{self._resume_hint()}") from None
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.RayTaskError) as e:
            raise LearnerFailed(f"{what} failed: {type(e).__name__}: {str(e).splitlines()[0]}"
                                f"{self._resume_hint()}") from e

    def _resume_hint(self) -> str:
        if self.last_checkpoint is None:
            return "; no checkpoint was written yet (run.checkpoint_every)"
        return f"; resume from {self.last_checkpoint} with run.resume=auto"

    def lanes(self, counters: Counters) -> list[Lane]:
        """One lane per task with a share of the batch (driver.lanes); the scoring thread is shared."""
        cfg, t = self.cfg, self.cfg.trainer
        mix = TaskMix.of(vars(cfg.tasks), t.groups_per_step)
        common = dict(max_staleness=t.max_staleness, group_size=cfg.data.group_size, scorer=self.scorer,
                      scoring=self.scoring, counters=counters, replicas=self.replicas)
        lanes: list[Lane] = [RT2ILane(slots=self.slots, quota=mix.rt2i, stream=self.sources.train,
                                      base_seed=cfg.run.seed, drop_zero_variance=t.drop_zero_variance, **common)]
        if mix.srr:
            seed = cfg.run.seed + SRR_SEED_OFFSET
            lanes.append(SRRLane(slots=self.refine_slots, quota=mix.srr, stream=self.sources.stream(seed),
                                 base_seed=seed, srr=cfg.srr, **common))
        return lanes

    # -- the update -------------------------------------------------------------------------------
    def start_update(self, batch: list[Ready], advantages: list[list[float]]) -> Update:
        """Queue one optimizer step and the weight broadcast after it.

        Each learner rank gets whole groups, the same number of each task in the same order (ZeRO-3
        gathers a module's weights as every rank enters it: the ranks' forward passes must call the same
        modules in the same order, and an SRR group calls the vision encoder an RT2I group does not),
        and pulls their trajectories from the object store (refs passed as arguments). Actor tasks run
        in submission order, so on learner rank 0 the manifest is read after the step and before the
        broadcast, and each rollout actor joins the broadcast after the group it is sampling."""
        shards = rank_shards([g.task for g in batch], len(self.learners))
        step = [learner.train_groups.remote([advantages[i] for i in shard], self.settings,
                                            *[batch[i].payload for i in shard])
                for learner, shard in zip(self.learners, shards)]
        send, recv, receivers = self.replicas.start_sync()
        return Update(step=step, send=send, receive=recv, receivers=receivers, batch=batch, advantages=advantages,
                      started=time.perf_counter(), staleness=[self.version - g.policy_version for g in batch])

    def _finish_update(self, step: int, update: Update, counters: Counters) -> StepRecord:
        """Collect a finished update: the step's results, the new version on every replica that received
        it (one that died meanwhile is taken out of the group; a broadcast that failed for it is redone
        after the regroup), and the step's record."""
        results = self._learners(update.step, f"the learner ranks' step {step}")
        self.version = results[0].version
        try:
            sent = self.ray.get(update.send, timeout=self.cfg.pools.learner.sync_timeout_s)
        except (self.ray.exceptions.RayTaskError, self.ray.exceptions.GetTimeoutError):
            sent = None                           # a receiver died mid-broadcast: regroup and push again
        self.replicas.finish_sync(update.receive, update.receivers)
        if sent is None:
            self.replicas.needs_regroup = True
            self._regroup()
            sent = []
        rec = self._record(step, update, results, sent, counters)
        counters.since = {k: 0 for k in counters.since}
        return rec

    def _regroup(self) -> None:
        """Rebuild the weight group with the live replicas (those Ray restarted among them) and push the
        learner's current weights to every member."""
        self.replicas.revive()
        try:
            self.replicas.regroup()
        except (ReplicaTimeout, self.ray.exceptions.RayActorError):
            self.replicas.needs_regroup = True    # a member died while regrouping: again next round
        live = self.replicas.live
        if not any(s.kind == "rollout" for s in live):
            raise RuntimeError("every rollout actor is dead and none came back; stopping" + self._resume_hint())

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, *, log: RunLog | None = None, on_step=None, checkpoints: Checkpointer | None = None,
            resume: Path | None = None, stop: threading.Event | None = None) -> RunResult:
        """Train up to `trainer.steps` steps. `on_step(pipeline, record)` runs after each update (weights
        synced); `checkpoints` writes the run's checkpoints; `resume` continues from one; `stop` (set by
        a signal handler) ends the run after the update in flight, with a checkpoint."""
        ray, cfg, t = self.ray, self.cfg, self.cfg.trainer
        t_start = time.perf_counter()
        result = RunResult()
        counters = Counters()
        lanes = self.lanes(counters)
        step = 0
        if resume is not None:
            state = read_json(resume / DRIVER)
            versions = self._learners([a.load_state.remote(str(resume / "learner")) for a in self.learners],
                                      f"the learner ranks' loading of {resume / 'learner'}")
            self.version, step, result.before = versions[0], state["step"], state.get("before")
            self.replicas.push()                  # every replica starts from the restored weights
            for lane in lanes:
                lane.restore(state["lanes"][lane.task])
            counters.total.update(state["counters"])
        elif cfg.eval.enabled and cfg.eval.before:
            result.before = self.evaluate()
        result.start_step = step
        fetch = lambda images: ray.get(list(images))  # noqa: E731

        def checkpoint(steps_done: int) -> None:
            self.last_checkpoint = checkpoints.save(
                steps_done, driver={"step": steps_done, "version": self.version, "counters": counters.total,
                                    "lanes": {lane.task: lane.state() for lane in lanes}, "before": result.before},
                learner=lambda folder: self._learners([a.save_state.remote(str(folder)) for a in self.learners],
                                                      f"the learner ranks' checkpoint into {folder}"),
                trainable=lambda path: self._learners([a.save_trainable.remote(str(path)) for a in self.learners],
                                                      "the learner ranks' trainable weights"),
                policy=lambda folder: self.save_policy(folder))

        update = None                             # the Update in flight
        while step < t.steps:
            stopping = stop is not None and stop.is_set()
            # 1. keep every free slot working, as far as the staleness bound allows (not while stopping)
            pending_version = self.version + (1 if update is not None else 0)
            if self.replicas.revive() and update is None:
                self._regroup()                   # a restarted replica is back: it joins and gets the weights
            for lane in lanes:
                lane.poll()
                if not stopping:
                    lane.fill(pending_version)
            # 2. wait for anything: finished work, a finished update
            waitables = [r for lane in lanes for r in lane.waitables()] + (update.refs if update else [])
            ready_refs, _ = ray.wait(waitables, num_returns=1, timeout=0.05) if waitables else ([], [])
            for ref in ready_refs:
                any(lane.handle(ref, ray) for lane in lanes)
            # 3. an update finished: record it, bump versions, checkpoint when due
            if update is not None and _all_done(ray, update.refs):
                rec = self._finish_update(step, update, counters)
                result.steps.append(rec)
                result.first_loss = rec.loss if result.first_loss is None else result.first_loss
                if log is not None:
                    log.step(rec, update.batch, update.advantages, fetch)
                self._publish(rec, lanes)
                if on_step is not None:
                    on_step(self, rec)
                step, update = step + 1, None
                if checkpoints is not None and (checkpoints.due(step) or stopping):
                    checkpoint(step)
            if stopping and update is None:
                result.stopped = True
                break
            # 4. once every lane has its quota of usable groups (in stream order), start an update
            if update is None and step < t.steps:
                if self.replicas.needs_regroup:
                    self._regroup()
                picks = [lane.peek(self.version) for lane in lanes]
                if all(p is not None for p in picks):
                    batch = [g for lane, p in zip(lanes, picks) for g in lane.pop(p)]
                    check_finite(batch)
                    adv = batch_advantages([g.rewards() for g in batch], std_scope=t.std_scope).per_group
                    if t.shuffle_advantages:
                        adv = shuffled_advantages(adv, seed=cfg.run.seed * 1_000_003 + step)
                    update = self.start_update(batch, adv)
                    counters.staleness_seen += update.staleness
        if checkpoints is not None and checkpoints.last_step != step:
            checkpoint(step)                      # at exit
        result.checkpoint = self.last_checkpoint
        result.trajectories = sum(lane.trajectories for lane in lanes)
        if cfg.eval.enabled and not result.stopped:
            result.after = self.evaluate()
        result.seconds = time.perf_counter() - t_start
        self.counters = counters
        return result

    def _publish(self, rec: StepRecord, lanes: list[Lane]) -> None:
        """The step on Ray's metrics (driver.telemetry): the dashboard and the Prometheus endpoint."""
        stats = self.reward.stats()
        restarts = {kind: sum(s.restarts for s in self.replicas.slots if s.kind == kind) for kind in ("rollout", "refine")}
        restarts.update(decomposer=stats.decomposer_pool.restarts, verifier=stats.verifier_pool.restarts)
        self.metrics.step(rec, lanes=lanes, restarts=restarts, cache_hit_rate=stats.cache_hit_rate)

    def _record(self, step: int, update: Update, results, sent, counters: Counters) -> StepRecord:
        batch, stale = update.batch, update.staleness
        mean, std = reward_stats([g.rewards() for g in batch])
        loss = sum(r.loss for r in results) / len(results) if results else 0.0
        st = [r.stats for r in results]
        policy = asdict(BatchStats.merge([BatchStats(**{k: v for k, v in s.items() if k in BATCH_STATS}) for s in st]))
        return StepRecord(step=step, policy_version=self.version, groups=len(batch), reward_mean=mean,
                          reward_std=std, judge_acc=batch_judge_acc([g.meta for g in batch]), loss=loss,
                          question_pass=question_pass_rates(s.audit for g in batch for s in g.scores.result()),
                          tasks=task_metrics(batch), srr_skipped=counters.since["srr_skipped"],
                          image_loss=policy["image_loss"], text_loss=policy["text_loss"],
                          staleness_max=max(stale), staleness_mean=sum(stale) / len(stale),
                          zero_variance_dropped=counters.since["zero_variance"],
                          stale_dropped=counters.since["stale"], image_clip_frac=policy["image_clip_frac"],
                          grad_norm=results[0].grad_norm, policy={**policy, "loss": loss},
                          seconds={"rollout": sum(g.meta.seconds for g in batch) / max(1, len(self.replicas.live)),
                                   "learn+sync": time.perf_counter() - update.started,
                                   "learn": max(r.seconds for r in results),        # slowest rank's step
                                   "sync": max((x.seconds for x in sent), default=float("nan"))})

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (driver.stages.heldout_metrics), the batches dealt out over the live rollout
        actors (each batch has a fixed seed, so the pooled results equal one process drawing them all);
        the images go from the object store to the verifiers."""
        requests = heldout_requests(self.sources.heldout, self.cfg.eval, policy_version=self.version)
        actors = [s.actor for s in self.slots if s.alive]
        drawn = [actors[i % len(actors)].draw_heldout.options(num_returns=1 + len(req.prompts)).remote(req)
                 for i, req in enumerate(requests)]
        samples = []
        for req, (meta_ref, *image_refs) in zip(requests, drawn):
            meta = self.ray.get(meta_ref, timeout=self.cfg.pools.learner.timeout_s)
            results = self.scorer.score(req.prompts, image_refs, key=f"heldout{req.index}")
            samples += heldout_samples(req, meta, results)
        return heldout_metrics(samples, self.sources.judges)

    def checksums(self) -> tuple[int, list[int]]:
        """(learner's gathered checksum, each live replica's: rollout actors, then refine actors)."""
        learner = self._learners([a.trainable_checksum.remote() for a in self.learners], "the learners' checksum")[0]
        return learner, self.replicas.get([s.actor.checksum.remote() for s in self.replicas.live],
                                           "the replicas' weight checksums")

    def save_policy(self, directory: str | Path) -> Path:
        """The trained policy as a checkpoint, written by a live rollout actor (its replica holds the
        learner's latest weights: `checksums` shows they are equal). The path is made absolute here,
        since the actor's working directory is not the driver's; on a multi-node cluster it must be
        on storage that node shares with the driver."""
        actor = next(s.actor for s in self.slots if s.alive)
        return Path(self._learners(actor.save_policy.remote(str(Path(directory).resolve())),
                                   f"writing the policy to {directory}"))

    def shutdown(self) -> None:
        self.scoring.shutdown(wait=False, cancel_futures=True)
        self.reward.shutdown()
        for a in self.learners:
            try:
                self.ray.get(a.shutdown.remote(), timeout=30)
            except Exception:
                pass
            self.ray.kill(a)
        for s in self.replicas.slots:
            self.ray.kill(s.actor)
        from ray.util.placement_group import remove_placement_group
        remove_placement_group(self.learner_group)


def _all_done(ray, refs: list) -> bool:
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    return len(ready) == len(refs)


def rank_shards(tasks: list[str], world_size: int) -> list[list[int]]:
    """Batch positions per learner rank: each task's groups dealt out in equal contiguous runs, every rank
    taking its run of each task in the same task order (the config makes each task's quota divide)."""
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for task in dict.fromkeys(tasks):
        where = [i for i, t in enumerate(tasks) if t == task]
        if len(where) % world_size:
            raise ValueError(f"rank_shards: {len(where)} {task} groups do not divide over {world_size} learner ranks")
        per = len(where) // world_size
        for r in range(world_size):
            shards[r] += where[r * per:(r + 1) * per]
    return shards


def _actor_options(pool) -> dict:
    """Ray actor options of a replica pool: its resources, restarts (the run takes a restarted replica
    back: driver.replicas), and its env as the actors' runtime env."""
    env = {"runtime_env": {"env_vars": dict(pool.env)}} if pool.env else {}
    return {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "max_restarts": -1, "max_task_retries": 0, **env}
