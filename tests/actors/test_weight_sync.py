"""Weight sync: the bucket plan, the checksum, and a real gloo broadcast from this process to two
receiver processes (torch.multiprocessing, forkserver) with the tiny model.

Chain checked by the broadcast test: sender's weights == each receiver's weights (bitwise)
=> receiver xxh3 == sender xxh3 == model_checksum(sender); collectives == buckets + 3 on every side;
a mismatched version, checksum or plan raises WeightSyncError on that receiver only, leaves it
refusing to sample (ready_for False), and the group stays in step for the next sync.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.multiprocessing as mp

from actors.weight_sync import (
    BroadcastGroup,
    WeightReceiver,
    WeightSyncError,
    build_manifest,
    free_port,
    gathered_buckets,
    model_checksum,
    plan_buckets,
    send_weights,
    trainable_named_parameters,
    weights_checksum,
)
from tests.umm.helpers import tiny_model

SMALL_BUCKET = 64 << 10  # the tiny model's ~0.85 MB of trainable weights -> a dozen buckets



# --------------------------------------------------------------------------- plan

@pytest.mark.parametrize("seed", range(20))
def test_bucket_plan_covers_every_tensor_once_in_order_and_respects_the_size(seed):
    rng = random.Random(seed)
    sizes = [rng.choice([4, 100, 1000, 5000]) for _ in range(rng.randint(0, 40))]
    limit = rng.choice([1, 1000, 4096, 10 ** 6])
    buckets = plan_buckets(sizes, limit)
    flat = [i for a, b in buckets for i in range(a, b)]
    assert flat == list(range(len(sizes)))                      # consecutive, each exactly once
    for a, b in buckets:
        assert b > a
        assert sum(sizes[a:b]) <= limit or b - a == 1           # only a lone tensor may exceed
    for (a, b), (c, _) in zip(buckets, buckets[1:]):
        assert sum(sizes[a:b]) + sizes[c] > limit               # greedy: the next one did not fit


def test_manifest_lists_only_trainable_tensors():
    model = tiny_model()
    named = trainable_named_parameters(model)
    m = build_manifest(named, version=3, bucket_bytes=SMALL_BUCKET)
    assert not any(n.startswith("vae.") or n.endswith("pos_embed") for n in m.names)  # frozen
    assert m.names == tuple(n for n, _ in named) and len(m.buckets) > 1
    assert m.total_bytes == sum(p.numel() * p.element_size() for _, p in named) == sum(m.bucket_sizes)
    assert m.digest() == m.with_version(9, checksum=1).digest()   # the plan, not the version
    assert m.digest() != build_manifest(named, version=3, bucket_bytes=2 * SMALL_BUCKET).digest()


def test_manifest_with_lora_moves_only_the_adapters():
    from umm.lora import LoRAConfig, apply_lora, lora_parameters
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=2, alpha=4))
    m = build_manifest(trainable_named_parameters(model), version=0)
    assert set(m.names) == set(lora_parameters(model)) and len(m.buckets) == 1


# --------------------------------------------------------------------------- checksum

def test_checksum_equal_for_equal_weights_and_changes_with_one_element():
    a, b = tiny_model(seed=0), tiny_model(seed=0)
    assert model_checksum(a) == model_checksum(b)
    with torch.no_grad():
        p = trainable_named_parameters(b)[5][1]
        p.view(-1)[7] = torch.nextafter(p.view(-1)[7], torch.tensor(float("inf")))  # one ulp
    assert model_checksum(a) != model_checksum(b)


def test_checksum_is_xxh3_of_the_concatenated_bytes_and_survives_the_int64_wire():
    import numpy as np
    import xxhash

    from actors.weights_hash import from_int64, to_int64

    tensors = [torch.randn(5), torch.arange(7, dtype=torch.int16), torch.randn(2, 3).to(torch.bfloat16)]
    raw = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors)
    assert weights_checksum(tensors) == xxhash.xxh3_64_intdigest(raw)
    assert weights_checksum([]) == xxhash.xxh3_64_intdigest(b"")
    for u in (0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, weights_checksum(tensors)):
        wire = torch.tensor([to_int64(u)], dtype=torch.int64)          # what the trailer carries
        assert from_int64(int(wire[0])) == u
    assert np.iinfo(np.int64).min <= to_int64((1 << 64) - 1) < 0


def test_checksum_is_order_sensitive_and_bucketing_free():
    x, y = torch.randn(10), torch.randn(10)
    assert weights_checksum([x, y]) != weights_checksum([y, x])
    model = tiny_model()
    assert model_checksum(model, bucket_bytes=SMALL_BUCKET) == model_checksum(model, bucket_bytes=1 << 30)


# --------------------------------------------------------------------------- broadcast

CHUNK = 256 << 10   # shared lane: the tiny model's slot is a few chunks


def _in_slot(group: BroadcastGroup, params) -> bool:
    """Every parameter's storage is the shared lane's mapped file (no copy of its own)."""
    return group.shared is not None and all(
        p.untyped_storage().data_ptr() == group.shared.buffer.untyped_storage().data_ptr() for _, p in params)


def _receiver_main(rank: int, port: int, lane: str, commands, results) -> None:
    """A receiver process: for each command (version, kind), receive one sync and report."""
    torch.set_num_threads(1)
    model = tiny_model(seed=100 + rank)   # different weights until the first sync
    receiver = WeightReceiver(model, bucket_bytes=SMALL_BUCKET)
    group = BroadcastGroup(host="127.0.0.1", port=port, rank=rank, world_size=3, timeout_s=600)
    chosen = group.open_lane(trainable_named_parameters(model), allow_shared=lane == "shared", chunk_bytes=CHUNK)
    results.put({"rank": rank, "lane": chosen})
    while (cmd := commands.get()) is not None:
        version, kind = cmd
        manifest = receiver.expected_manifest(version)
        if kind == "wrong_version":
            manifest = manifest.with_version(version + 5)
        elif kind == "wrong_checksum":
            manifest = manifest.with_version(version, checksum=12345)
        elif kind == "wrong_plan":
            manifest = WeightReceiver(model, bucket_bytes=SMALL_BUCKET * 2).expected_manifest(version)
        elif kind == "tamper":   # shared lane: flip a byte of the slot after the sender hashed it
            broadcast, calls = group.broadcast, []

            def tampering(tensor, **kw):
                out = broadcast(tensor, **kw)
                calls.append(1)
                if len(calls) == 1:   # the header has arrived: the slot is written and hashed
                    group.shared.slot(version % 2)[100] ^= 0xFF
                return out
            group.broadcast = tampering
        first = group.collectives
        try:
            stats = receiver.receive(group, manifest)
            error = None
        except WeightSyncError as e:
            stats, error = None, str(e)
        if kind == "tamper":
            group.broadcast = broadcast
        params = trainable_named_parameters(model)
        weights = {n: p.detach().clone().numpy() for n, p in params}
        results.put({"rank": rank, "error": error, "stats": stats, "collectives": group.collectives - first,
                     "ready": receiver.ready_for(version), "checksum": model_checksum(model), "weights": weights,
                     "in_slot": _in_slot(group, params)})
    group.close()


@pytest.fixture(scope="module", params=["gloo", "shared"])
def broadcast_world(request):
    """This process as sender (rank 0) and two receiver processes (ranks 1, 2), on either lane."""
    import glob

    torch.set_num_threads(1)
    lane = request.param
    before = set(glob.glob("/dev/shm/alphagrpo-weights-*"))
    # forkserver: one fresh process imports the model stack once and forks both receivers from it
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.actors.test_weight_sync"])
    port = free_port()
    queues = [ctx.Queue() for _ in range(2)]
    results = ctx.Queue()
    procs = [ctx.Process(target=_receiver_main, args=(r + 1, port, lane, queues[r], results), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    group = BroadcastGroup(host="127.0.0.1", port=port, rank=0, world_size=3, timeout_s=600)
    chosen = group.open_lane(trainable_named_parameters(tiny_model()), allow_shared=lane == "shared",
                             chunk_bytes=CHUNK)
    assert chosen == lane and all(results.get(timeout=600)["lane"] == lane for _ in procs)
    assert set(glob.glob("/dev/shm/alphagrpo-weights-*")) == before    # unlinked once everyone mapped it
    yield group, queues, results
    for q in queues:
        q.put(None)
    for p in procs:
        p.join(timeout=30)
    group.close()


def _sync(world, model, version, kinds):
    group, queues, results = world
    for q, kind in zip(queues, kinds):
        q.put((version, kind))
    named = trainable_named_parameters(model)
    manifest = build_manifest(named, version=version, bucket_bytes=SMALL_BUCKET)
    first = group.collectives
    stats = send_weights(group, gathered_buckets([p for _, p in named], manifest), manifest)
    expected = len(manifest.buckets) + 3 if group.lane == "gloo" else 3   # header, digests, all_reduce
    assert group.collectives - first == stats.collectives == expected
    got = sorted((results.get(timeout=600) for _ in queues), key=lambda r: r["rank"])
    return manifest, stats, got


def test_broadcast_to_two_receivers_is_bitwise_and_verified(broadcast_world):
    group = broadcast_world[0]
    model = tiny_model(seed=0)
    manifest, stats, got = _sync(broadcast_world, model, 1, ["ok", "ok"])
    assert stats.bytes == manifest.total_bytes
    if group.lane == "gloo":
        assert stats.buckets == len(manifest.buckets) > 1
        assert stats.checksum == model_checksum(model)
    else:   # the shared lane's checksum is over the slot's chunk digests; every receiver accepted
        assert stats.receivers_verified is True and group.shared.layout.n_chunks > 1
    for r in got:
        assert r["error"] is None and r["ready"]
        assert r["stats"].checksum == stats.checksum and r["stats"].buckets == stats.buckets
        assert r["checksum"] == model_checksum(model)
        assert r["collectives"] == stats.collectives
        assert r["in_slot"] == (group.lane == "shared")             # no copy: the parameters live in the file
        for n, p in trainable_named_parameters(model):
            assert torch.equal(torch.from_numpy(r["weights"][n]), p.detach()), n


@pytest.mark.parametrize("kind, message", [("wrong_version", "expected 7"), ("wrong_checksum", "0x0000000000003039"),
                                           ("wrong_plan", "bucket plan")])
def test_mismatch_is_refused_by_that_receiver_only(broadcast_world, kind, message):
    model = tiny_model(seed=1)
    with torch.no_grad():
        trainable_named_parameters(model)[0][1].add_(1.0)
    _, stats, (good, bad) = _sync(broadcast_world, model, 2, ["ok", kind])
    assert good["error"] is None and good["ready"] and good["checksum"] == model_checksum(model)
    assert bad["error"] is not None and message in bad["error"], bad["error"]
    assert not bad["ready"]                                         # refuses to sample
    assert bad["collectives"] == good["collectives"]                # drained: the group stays in step
    assert stats.receivers_verified is (None if broadcast_world[0].lane == "gloo" else False)
    # the next correct sync is accepted again
    _, stats, got = _sync(broadcast_world, model, 3, ["ok", "ok"])
    assert all(r["error"] is None and r["ready"] and r["checksum"] == model_checksum(model) for r in got)


def test_shared_lane_alternates_slots_and_rejects_a_changed_slot(broadcast_world):
    group = broadcast_world[0]
    if group.lane != "shared":
        pytest.skip("shared-lane behaviour")
    a, b = tiny_model(seed=2), tiny_model(seed=3)
    _sync(broadcast_world, a, 4, ["ok", "ok"])
    _, _, got = _sync(broadcast_world, b, 5, ["ok", "ok"])          # slot 1 now, slot 0 still holds a
    assert all(r["checksum"] == model_checksum(b) for r in got)
    first_a = trainable_named_parameters(a)[0][1].detach().reshape(-1).view(torch.uint8)
    assert torch.equal(group.shared.slot(0)[:first_a.numel()], first_a)
    _, stats, (tampered, other) = _sync(broadcast_world, a, 6, ["tamper", "ok"])
    assert "differ from the sender's digests" in tampered["error"] and not tampered["ready"]
    assert stats.receivers_verified is False                       # the sender hears of it
    # (the other receiver reads the same bytes; whether it hashed them before or after the flip is a race)
    _, stats, got = _sync(broadcast_world, b, 7, ["ok", "ok"])     # a clean sync is accepted again
    assert stats.receivers_verified and all(r["ready"] and r["checksum"] == model_checksum(b) for r in got)


def _lora_model(seed: int):
    from umm.lora import LoRAConfig, apply_lora
    model = tiny_model(seed=0)                       # the same frozen base everywhere
    torch.manual_seed(seed)
    apply_lora(model, LoRAConfig(rank=2, alpha=4))
    with torch.no_grad():                            # B is zero-initialised: make the adapters differ
        for _, p in trainable_named_parameters(model):
            p.copy_(torch.randn_like(p))
    return model


def _pair_receiver(port: int, allow_shared: bool, results) -> None:
    """One receiver with a LoRA policy: reports the lane, then one sync's outcome."""
    torch.set_num_threads(1)
    model = _lora_model(seed=5)
    receiver = WeightReceiver(model, bucket_bytes=SMALL_BUCKET)
    group = BroadcastGroup(host="127.0.0.1", port=port, rank=1, world_size=2, timeout_s=600)
    lane = group.open_lane(trainable_named_parameters(model), allow_shared=allow_shared, chunk_bytes=CHUNK)
    stats = receiver.receive(group, receiver.expected_manifest(1))
    params = trainable_named_parameters(model)
    results.put({"lane": lane, "checksum": stats.checksum, "model_checksum": model_checksum(model),
                 "in_slot": _in_slot(group, params), "weights": {n: p.detach().clone().numpy() for n, p in params}})
    group.close()


@pytest.mark.parametrize("receiver_allows, lane", [(True, "shared"), (False, "gloo")])
def test_lora_adapters_sync_and_one_refusing_rank_forces_gloo_for_all(receiver_allows, lane):
    """The lane is agreed by all ranks (the sender allows the shared lane here; the receiver decides),
    and LoRA replicas receive only their adapters on either lane."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.actors.test_weight_sync"])
    port, results = free_port(), ctx.Queue()
    proc = ctx.Process(target=_pair_receiver, args=(port, receiver_allows, results), daemon=True)
    proc.start()
    model = _lora_model(seed=6)
    group = BroadcastGroup(host="127.0.0.1", port=port, rank=0, world_size=2, timeout_s=600)
    try:
        named = trainable_named_parameters(model)
        assert all(".lora_" in n for n, _ in named)
        assert group.open_lane(named, allow_shared=True, chunk_bytes=CHUNK) == lane
        manifest = build_manifest(named, version=1, bucket_bytes=SMALL_BUCKET)
        sent = send_weights(group, gathered_buckets([p for _, p in named], manifest), manifest)
        got = results.get(timeout=600)
    finally:
        group.close()
        proc.join(timeout=30)
    assert got["lane"] == lane and got["checksum"] == sent.checksum
    assert got["model_checksum"] == model_checksum(model) and got["in_slot"] == (lane == "shared")
    for n, p in named:
        assert torch.equal(torch.from_numpy(got["weights"][n]), p.detach()), n
