"""The policy replicas (rollout and refine actors) and their weight group: who is alive, which version
each holds, and how a replica that died comes back.

    weight group   learner rank 0 (rank 0) + every live replica; its own gloo group (actors.weight_sync)
    a replica dies its in-flight work is re-queued by its lane (driver.lanes); the group is rebuilt
                   without it before the next broadcast (a broadcast to a dead member would wait for
                   its timeout, pools.learner.sync_timeout_s, and fail); Ray restarts the actor
                   (max_restarts=-1), which loads the base policy and refuses to sample until it has
                   joined the rebuilt group and received the current weights, checksum-verified
    it comes back  a ping answers (the restarted actor's __init__ is done): the group is rebuilt with
                   it and the learner's current weights are pushed to every member

No call here waits without a limit: each names what it waited for when it times out.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class Slot:
    """A policy replica (rollout or refine actor) and what it is doing."""
    actor: object
    index: int
    kind: str = "rollout"             # "rollout" | "refine"
    version: int = 0
    busy: object = None               # the meta ref of its current work
    syncing: bool = False
    alive: bool = True                # in the weight group, holding a verified version
    back: bool = False                # dead, but Ray restarted it and it answered: joins at the next regroup
    ping: object = None               # while dead: the ref of a ping that answers once Ray restarted it
    restarts: int = 0

    @property
    def name(self) -> str:
        return f"{'RolloutWorker' if self.kind == 'rollout' else 'RefineWorker'} {self.index}"


class ReplicaTimeout(TimeoutError):
    """A call to the replicas or learners took longer than its configured limit (named in the message)."""


class Replicas:
    """Every policy replica of a run, in weight-group rank order (rollout actors, then refine actors)."""

    def __init__(self, ray, learners: list, slots: list[Slot], *, lane: str, sync_timeout_s: float,
                 sync_port: int = 0) -> None:
        self.ray, self.learners, self.slots = ray, learners, slots
        self.lane_wanted, self.sync_timeout_s, self.sync_port = lane, sync_timeout_s, sync_port
        self.needs_regroup = False
        self.lane = ""

    @property
    def live(self) -> list[Slot]:
        return [s for s in self.slots if s.alive]

    def get(self, refs, what: str):
        try:
            return self.ray.get(refs, timeout=self.sync_timeout_s)
        except self.ray.exceptions.GetTimeoutError:
            raise ReplicaTimeout(f"{what}: no answer within pools.learner.sync_timeout_s={self.sync_timeout_s:g} s")

    def join(self) -> str:
        """(Re)build the weight group: learner rank 0 hosts it on its node, every live replica joins (a
        replica that was in an older group leaves it first). Returns the lane ("shared" or "gloo")."""
        addr, port = self.get(self.learners[0].rendezvous.remote(), "learner rank 0's rendezvous address")
        port = self.sync_port or port
        for s in self.slots:
            if s.back:                            # a restarted replica joins now (and gets the weights next)
                s.alive, s.back = True, False
        live = self.live
        world, shared = 1 + len(live), self.lane_wanted == "auto"
        joins = [self.learners[0].join_weight_group.remote(addr, port, world, shared)]
        joins += [s.actor.join_weight_group.remote(addr, port, world, 1 + i, shared) for i, s in enumerate(live)]
        self.lane = self.get(joins, f"the weight group of learner rank 0 and {len(live)} replicas")[0]
        self.needs_regroup = False
        return self.lane

    def start_sync(self) -> tuple[list, list, list[Slot]]:
        """Queue one broadcast of the learner's current weights: (learner send refs, replica receive refs,
        the receiving slots). Every learner rank takes part in the gathers; rank 0 sends."""
        manifest = self.learners[0].weight_manifest.remote()
        send = [a.broadcast_weights.remote() for a in self.learners]
        live = self.live
        recv = [s.actor.receive_weights.remote(manifest) for s in live]
        for s in live:
            s.syncing = True
        return send, recv, live

    def finish_sync(self, recv: list, slots: list[Slot]) -> None:
        """Take the replicas' answers to a broadcast: the version each now holds; one that died meanwhile
        is marked dead (the group is rebuilt before the next broadcast)."""
        for ref, slot in zip(recv, slots):
            slot.syncing = False
            try:
                slot.version = self.ray.get(ref, timeout=self.sync_timeout_s)
            except self.ray.exceptions.RayActorError:
                self.mark_dead(slot)

    def push(self) -> list:
        """Broadcast the learner's current weights to every live replica now (after a regroup or a resume);
        returns the learner ranks' sync stats."""
        send, recv, slots = self.start_sync()
        sent = self.get(send, "the learner ranks' weight broadcast")
        self.finish_sync(recv, slots)
        return sent

    def mark_dead(self, slot: Slot) -> None:
        if slot.alive:
            slot.alive, slot.busy, slot.syncing, slot.restarts = False, None, False, slot.restarts + 1
            slot.ping = None
            self.needs_regroup = True

    def revive(self) -> bool:
        """Ping the dead replicas (non-blocking); those whose restarted actor answers are marked `back`:
        they join at the next regroup (and hold no verified version until its push). True if any is back."""
        for s in self.slots:
            if s.alive or s.back:
                continue
            if s.ping is None:
                s.ping = s.actor.held_version.remote()
                continue
            ready, _ = self.ray.wait([s.ping], timeout=0)
            if not ready:
                continue
            try:
                self.ray.get(s.ping)
            except self.ray.exceptions.RayActorError:
                s.ping = None                 # still restarting (or gone): ask again later
                continue
            s.back, s.ping, s.version = True, None, -1
            self.needs_regroup = True
        return any(s.back for s in self.slots)

    def regroup(self) -> None:
        """Rebuild the group with the live replicas and give every one the learner's current weights."""
        self.join()
        self.push()
