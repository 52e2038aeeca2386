"""The pipeline's production lines, one per task: free policy replicas in, scored groups out.

    RT2ILane  rollout slots   GroupRequest ─sample─► (meta, payload, images) ─score─► Ready
    SRRLane   refine slots    Episode ─candidates─► K images ─score─► initial picked (driver.srr)
                              ─reflect(initial image ref)─► (meta, payload, images) ─score─► Ready
                              (trained on its rectified rewards)

A lane starts work on its free slots within the staleness bound (`fill`), takes its finished refs
(`handle`, `poll`), and offers the driver its quota of usable groups in stream order (`peek`, then
`pop` once every lane has its quota), dropping on the way what cannot train: groups too stale (both
lanes), zero-variance groups (RT2I, with trainer.drop_zero_variance), and an SRR sub-batch in which
no refinement beat its initial image (the method's skip rule). Every drop is counted.

A replica that dies with work in flight loses nothing: the lane re-queues that work (the same request,
index and seed; SRR at the stage it had reached) for the next free slot, and `Replicas` takes the
actor out of the weight group until it is back (driver.replicas).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from driver.replicas import Replicas, Slot
from driver.srr import Episode, choose_initial, rectify
from driver.stages import GroupStream, Scorer
from grpo.groups import GroupMeta
from grpo.srr import SRRConfig
from worlds.base import PromptSource
from worlds.records import PromptRecord


@dataclass(kw_only=True)
class Ready:
    """A sampled group waiting for (or done with) its rewards."""
    task: str                         # "rt2i" | "srr"
    index: int                        # position in its task's stream
    prompt: PromptRecord
    policy_version: int               # the policy that drew the trained trajectories
    meta: GroupMeta
    payload: object                   # the GroupPayload (sync mode), or its object-store ref (pipeline)
    scores: Future                    # -> list[ScoreResult] (reward + audit per image)
    images: list = field(default_factory=list)   # the group's images: arrays (sync) or object-store refs
    episode: Episode | None = None    # SRR: the stage-1 rewards and the initial image

    def raw_rewards(self) -> list[float]:
        """DVReward per image (raises if scoring failed: an error, never a 0)."""
        return [s.reward for s in self.scores.result()]

    def rewards(self) -> list[float]:
        """What the group trains on: SRR's are rectified (driver.srr.rectify)."""
        raw = self.raw_rewards()
        return raw if self.episode is None else rectify(self.episode, raw).rewards


COUNTED = ("zero_variance", "stale", "srr_skipped", "requeued")


@dataclass(kw_only=True)
class Counters:
    """Drops and skips, in total and since the last step (`since`, reset by the driver)."""
    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTED, 0))
    since: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTED, 0))
    staleness_seen: list[int] = field(default_factory=list)   # learner version - group version, per trained group

    def add(self, key: str, n: int = 1) -> None:
        self.total[key] += n
        self.since[key] += n


class Lane:
    """What both lanes share: stream order, the staleness bound, taking a quota."""
    task = ""

    def __init__(self, *, slots: list[Slot], quota: int, max_staleness: int, group_size: int, scorer: Scorer,
                 scoring: ThreadPoolExecutor, counters: Counters, replicas: Replicas | None = None) -> None:
        self.slots, self.quota, self.s_max, self.group_size = slots, quota, max_staleness, group_size
        self.replicas = replicas
        self.scorer, self.scoring, self.counters = scorer, scoring, counters
        self.order: deque[int] = deque()          # indices in stream order, not yet consumed or dropped
        self.done: dict[int, Ready] = {}
        self.inflight: dict = {}                  # meta ref -> what it is
        self.trajectories = 0

    def free_slots(self, pending_version: int):
        """Slots that may start work now: idle, not syncing, within the staleness bound."""
        return [s for s in self.slots if s.alive and s.busy is None and not s.syncing
                and 0 <= s.version and pending_version - s.version <= self.s_max]

    def room(self) -> bool:
        """Whether another group may be started (on-policy: exactly what the next step needs)."""
        return len(self.order) < self.quota * (1 + self.s_max)

    def waitables(self) -> list:
        return list(self.inflight)

    def poll(self) -> None:
        """Advance work that waits on the scoring thread (nothing for RT2I)."""

    def take(self, ref, ray):
        """(its in-flight entry, its metadata) for a finished ref of this lane; (entry, None) when the
        replica died doing it (the replica is marked dead, the caller re-queues the entry); None when the
        ref is not this lane's. Any other failure raises (e.g. a replica refusing stale weights)."""
        if ref not in self.inflight:
            return None
        entry = self.inflight.pop(ref)
        slot = entry[0]                           # every in-flight entry starts with its slot
        slot.busy = None
        try:
            return entry, ray.get(ref)
        except ray.exceptions.RayActorError:
            if self.replicas is not None:
                self.replicas.mark_dead(slot)
            else:
                slot.alive = False
            self.counters.add("requeued")
            return entry, None

    def score(self, prompt: PromptRecord, image_refs: list, key: str) -> Future:
        return self.scoring.submit(self.scorer.score, [prompt] * len(image_refs), image_refs, key=key)

    def peek(self, version: int) -> list[int] | None:
        """The indices of this lane's next quota of usable groups, once all are scored; unusable ones on
        the way are dropped and counted. None while the quota is not there yet."""
        if self.quota == 0:
            return []
        picked = []
        for idx in list(self.order):
            g = self.done.get(idx)
            if g is None or not g.scores.done():
                return None                       # keep stream order: wait for this one
            if version - g.policy_version > self.s_max:
                self._drop(idx, "stale")
                continue
            if self.unusable(g):
                self._drop(idx, "zero_variance")
                continue
            picked.append(idx)
            if len(picked) == self.quota:
                return picked if self.accept(picked) else None
        return None

    def pop(self, picked: list[int]) -> list[Ready]:
        for i in picked:
            self.order.remove(i)
        out = [self.done.pop(i) for i in picked]
        self._forget()
        return out

    def _drop(self, idx: int, why: str) -> None:
        self.order.remove(idx)
        self.done.pop(idx)
        self.counters.add(why)
        self._forget()

    # -- exact resume: restart at the first group not yet trained --------------------------------
    def state(self) -> dict:
        first = min(self.order) if self.order else self.requests.index
        return self.requests.state_at(first)

    def restore(self, state: dict) -> None:
        self.requests.restore(state)

    def _forget(self) -> None:
        self.requests.forget_before(min(self.order) if self.order else self.requests.index)

    def unusable(self, g: Ready) -> bool:
        return False

    def accept(self, picked: list[int]) -> bool:
        return True


class RT2ILane(Lane):
    """Reasoning text-to-image on the rollout slots."""
    task = "rt2i"

    def __init__(self, *, stream: PromptSource, base_seed: int, drop_zero_variance: bool, **kw) -> None:
        super().__init__(**kw)
        self.requests = GroupStream(stream, group_size=self.group_size, base_seed=base_seed)
        self.drop_zero_variance = drop_zero_variance
        self.retry: deque = deque()               # requests whose replica died: sampled again first

    def fill(self, pending_version: int) -> None:
        for slot in self.free_slots(pending_version):
            if self.retry:
                req = replace(self.retry.popleft(), policy_version=slot.version)
            elif self.room():
                req = self.requests.next_request(policy_version=slot.version)
                self.order.append(req.index)
            else:
                return
            meta_ref, payload_ref, *image_refs = slot.actor.sample.options(num_returns=2 + req.group_size).remote(req)
            slot.busy = meta_ref
            self.inflight[meta_ref] = (slot, req, payload_ref, image_refs)

    def handle(self, ref, ray) -> bool:
        taken = self.take(ref, ray)
        if taken is None:
            return False
        (slot, req, payload_ref, image_refs), meta = taken
        if meta is None:
            self.retry.append(req)
            return True
        self.trajectories += req.group_size
        self.done[req.index] = Ready(task=self.task, index=req.index, prompt=req.prompt,
                                     policy_version=req.policy_version, meta=meta, payload=payload_ref,
                                     scores=self.score(req.prompt, image_refs, f"group{req.index}"), images=image_refs)
        return True

    def unusable(self, g: Ready) -> bool:
        r = g.rewards()
        return self.drop_zero_variance and max(r) - min(r) <= 1e-8


class SRRLane(Lane):
    """Self-reflective refinement on the refine slots: stage 1 (candidates), the pick, stage 2."""
    task = "srr"

    def __init__(self, *, stream: PromptSource, base_seed: int, srr: SRRConfig, **kw) -> None:
        super().__init__(**kw)
        self.requests = GroupStream(stream, group_size=self.group_size, base_seed=base_seed)   # one per episode
        self.srr = srr
        self.picking: list[tuple[Episode, Future, list]] = []   # stage 1 scored on the scoring thread
        self.restart: deque[Episode] = deque()                  # stage 1 again (its replica died)
        self.initial_refs: dict[int, object] = {}               # episode index -> its initial image's ref
        self.waiting: deque[tuple[Episode, object]] = deque()   # (episode, the initial image's ref)

    def fill(self, pending_version: int) -> None:
        for slot in self.free_slots(pending_version):
            if self.restart:                      # stage 1 again: its replica died drawing the candidates
                episode = self.restart.popleft()
                episode.stage1_version = slot.version
                meta_ref, *image_refs = slot.actor.candidates.options(
                    num_returns=1 + self.srr.candidates).remote(episode.candidates(self.srr.candidates))
                self.inflight[meta_ref] = (slot, "candidates", episode, image_refs)
            elif self.waiting:                    # stage 2 first: its episode is already under way
                episode, initial_ref = self.waiting.popleft()
                req = episode.reflect(group_size=self.group_size, policy_version=slot.version)
                meta_ref, payload_ref, *image_refs = slot.actor.reflect.options(
                    num_returns=2 + req.group_size).remote(req, initial_ref)
                self.inflight[meta_ref] = (slot, "reflect", episode, req, payload_ref, image_refs)
            elif self.room():
                episode = Episode.of(self.requests.next_request(policy_version=slot.version))
                self.order.append(episode.index)
                meta_ref, *image_refs = slot.actor.candidates.options(
                    num_returns=1 + self.srr.candidates).remote(episode.candidates(self.srr.candidates))
                self.inflight[meta_ref] = (slot, "candidates", episode, image_refs)
            else:
                return
            slot.busy = meta_ref

    def handle(self, ref, ray) -> bool:
        taken = self.take(ref, ray)
        if taken is None:
            return False
        (slot, kind, episode, *rest), meta = taken
        if meta is None:                          # the replica died: redo this stage elsewhere
            if kind == "candidates":
                self.restart.append(episode)
            else:
                self.waiting.appendleft((episode, self.initial_refs[episode.index]))
            return True
        if kind == "candidates":
            (image_refs,) = rest
            self.picking.append((episode, self.score(episode.prompt, image_refs, f"srr{episode.index}/stage1"),
                                 image_refs))
            return True
        req, payload_ref, image_refs = rest
        self.initial_refs.pop(episode.index, None)
        self.trajectories += req.group_size
        self.done[episode.index] = Ready(task=self.task, index=episode.index, prompt=episode.prompt,
                                         policy_version=req.policy_version, meta=meta, payload=payload_ref,
                                         scores=self.score(episode.prompt, image_refs, f"srr{episode.index}"),
                                         images=image_refs, episode=episode)
        return True

    def poll(self) -> None:
        still = []
        for episode, future, image_refs in self.picking:
            if future.done():
                chosen = choose_initial(episode, [s.reward for s in future.result()], self.srr)
                self.initial_refs[episode.index] = image_refs[chosen]
                self.waiting.append((episode, image_refs[chosen]))
            else:
                still.append((episode, future, image_refs))
        self.picking = still

    def accept(self, picked: list[int]) -> bool:
        """The skip rule: a sub-batch where no refinement beat its initial image trains nothing; its
        groups are dropped and the skip counted."""
        improved = sum(rectify(self.done[i].episode, self.done[i].raw_rewards()).improved for i in picked)
        if improved == 0:
            for i in picked:
                self.order.remove(i)
                self.done.pop(i)
            self._forget()
            self.counters.add("srr_skipped")
            return False
        return True
