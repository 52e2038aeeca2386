"""P2 of issue 6: weight-sync time / (bytes / measured memory-copy bandwidth).

    python -m bench.weight_sync --mb 64 --receivers 1 [--lane gloo]

The receivers run on this machine, so the default lane is the shared-memory one (actors.shm_lane);
`--lane gloo` measures the broadcast every group falls back to when a receiver is on another node.

The sender is this process (broadcast rank 0, a plain module: the sync path after the ZeRO-3
gathers); receivers are spawned processes loading into a model of the same shapes through
`WeightReceiver` (header, sizes, one collective per bucket, trailer, xxh3-64 of the loaded weights).
One sync's time is the slowest side's; the ideal is one memcpy of the payload at the bandwidth
measured here (best of 5 `copy_` of a warm buffer of the same size). `wire_s` times one plain gloo
broadcast of the whole payload (the transport's floor), `checksum_s` one xxh3-64 pass over it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.multiprocessing as mp
from torch import nn

from actors.weight_sync import (
    BroadcastGroup,
    WeightReceiver,
    build_manifest,
    free_port,
    gathered_buckets,
    send_weights,
    trainable_named_parameters,
    weights_checksum,
)



def _synthetic(total_bytes: int, tensor_bytes: int, *, fill: bool) -> nn.Module:
    n = max(1, total_bytes // tensor_bytes)
    g = torch.Generator().manual_seed(0)
    make = (lambda: torch.randn(tensor_bytes // 4, generator=g)) if fill else (lambda: torch.zeros(tensor_bytes // 4))
    return nn.ParameterList([nn.Parameter(make()) for _ in range(n)])


def memcpy_bandwidth(nbytes: int, *, trials: int = 5) -> float:
    """Bytes per second of one warm `copy_` of `nbytes` (best of `trials`)."""
    src = torch.randn(max(1, nbytes // 4))
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return src.numel() * 4 / best


def _receiver(rank: int, world: int, port: int, sizes: tuple[int, int, int], repeats: int, results,
              lane: str) -> None:
    torch.set_num_threads(1)
    total_bytes, tensor_bytes, bucket_bytes = sizes
    model = _synthetic(total_bytes, tensor_bytes, fill=False)
    receiver = WeightReceiver(model, bucket_bytes=bucket_bytes)
    group = BroadcastGroup(host="127.0.0.1", port=port, rank=rank, world_size=world)
    group.open_lane(trainable_named_parameters(model), allow_shared=lane != "gloo")
    for version in range(1, repeats + 1):
        stats = receiver.receive(group, receiver.expected_manifest(version))
        results.put((rank, version, stats.seconds))
    results.put((rank, "wire", _raw_broadcasts(group, total_bytes, repeats)))
    group.close()


def _raw_broadcasts(group: BroadcastGroup, nbytes: int, repeats: int) -> list[float]:
    """The transport alone: one gloo broadcast of the whole payload, no packing, no checksum."""
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        group.broadcast(buf)
        out.append(time.perf_counter() - t0)
    return out


def measure_sync(*, total_bytes: int = 64 << 20, n_receivers: int = 1, bucket_bytes: int = 32 << 20,
                 tensor_bytes: int = 4 << 20, repeats: int = 3, lane: str = "auto") -> dict:
    """Time `repeats` syncs of `total_bytes` to `n_receivers` processes; returns the P2 ratio and parts."""
    ctx = mp.get_context("spawn")
    port, world, results = free_port(), n_receivers + 1, ctx.Queue()
    sizes = (total_bytes, tensor_bytes, bucket_bytes)
    procs = [ctx.Process(target=_receiver, args=(r, world, port, sizes, repeats, results, lane), daemon=True)
             for r in range(1, world)]
    for p in procs:
        p.start()
    model = _synthetic(total_bytes, tensor_bytes, fill=True)
    named = trainable_named_parameters(model)
    params = [p for _, p in named]
    group = BroadcastGroup(host="127.0.0.1", port=port, rank=0, world_size=world)
    chosen = group.open_lane(named, allow_shared=lane != "gloo")
    per_sync = []
    try:
        for version in range(1, repeats + 1):
            manifest = build_manifest(named, version=version, bucket_bytes=bucket_bytes)
            sent = send_weights(group, gathered_buckets(params, manifest), manifest)
            got = [results.get(timeout=600)[2] for _ in procs]
            per_sync.append(max([sent.seconds, *got]))
        wire_sender = _raw_broadcasts(group, manifest.total_bytes, repeats)
        wire = [max(x) for x in zip(wire_sender, *(results.get(timeout=600)[2] for _ in procs))]
    finally:
        group.close()
        for p in procs:
            p.join(timeout=60)
    t0 = time.perf_counter()
    weights_checksum(params)
    checksum_s = time.perf_counter() - t0
    payload = manifest.total_bytes
    bandwidth = memcpy_bandwidth(payload)
    sync_s = statistics.median(per_sync)
    ideal_s = payload / bandwidth
    return {"lane": chosen, "bytes": payload, "buckets": len(manifest.buckets), "receivers": n_receivers,
            "sync_s": sync_s, "sync_s_all": per_sync, "memcpy_GBps": bandwidth / 1e9, "ideal_s": ideal_s,
            "ratio": sync_s / ideal_s, "checksum_s": checksum_s, "sync_GBps": payload / sync_s / 1e9,
            "wire_s": statistics.median(wire), "wire_ratio": statistics.median(wire) / ideal_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=64, help="payload in MiB")
    ap.add_argument("--receivers", type=int, default=1)
    ap.add_argument("--bucket-mb", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lane", choices=("auto", "gloo"), default="auto",
                    help="auto: the shared-memory lane when every receiver is on this node (as here)")
    a = ap.parse_args()
    r = measure_sync(total_bytes=a.mb << 20, n_receivers=a.receivers, bucket_bytes=a.bucket_mb << 20,
                     repeats=a.repeats, lane=a.lane)
    print(json.dumps(r, indent=2))
    print(json.dumps({"bench": "P2 weight-sync time / (bytes / memcpy bandwidth)", "lane": r["lane"],
                      "bytes": r["bytes"], "receivers": r["receivers"], "sync_ms": round(r["sync_s"] * 1e3, 1),
                      "ideal_ms": round(r["ideal_s"] * 1e3, 1), "ratio": round(r["ratio"], 2), "goal": 1.5}))


if __name__ == "__main__":
    main()
