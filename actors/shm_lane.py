"""The same-node weight lane: the weights cross a shared-memory file once, receivers read them in place.

When every receiver of a weight group runs on learner rank 0's node (the embedded default; a GPU node's
CPU-side rollout actors), pushing the payload through gloo's loopback TCP costs 5-9x a memory copy.
Instead:

    file /dev/shm/alphagrpo-weights-*   (unlinked as soon as every rank has mapped it: nothing is left
                                          behind, even if a process dies)
         slot 0 | slot 1                 each slot: every trainable tensor at a 64-byte aligned offset
    sync v (slot v % 2; receivers at v - 1 are reading the other slot meanwhile):
      sender     writes the tensors bucket by bucket (ZeRO-3 gathers), hashes the slot in 4 MiB chunks
                 (xxh3-64), broadcasts a header [magic, version, plan digest, slot, chunks] and the
                 chunk digests (gloo, a few hundred bytes)
      receivers  check version and plan, hash every chunk against its digest, then point their
                 parameters at the slot (no copy)
      all        all_reduce(MIN, accepted): the sender learns whether every receiver accepted, and
                 returns only once no receiver can still be reading slot (v + 1) % 2, which the
                 next sync overwrites

Receivers share the slot's memory, so they must treat the weights as read-only (rollout and refine
actors only sample); a replica whose parameters live on an accelerator copies the verified slot into
them instead (not exercised here: no GPU). A receiver that refuses a sync keeps taking part in every collective, like on the
gloo lane, and holds no version until the next verified sync.

The lane is chosen when the group is formed (`open_lane`): every rank reports whether it shares rank
0's node (hostname and boot id) and whether /dev/shm has room for both slots; all must agree.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from actors.weights_hash import WeightsHash, byte_view, to_int64

ALIGN = 64
DEFAULT_CHUNK_BYTES = 4 << 20
SHM_DIR = "/dev/shm"
MAGIC = 0x57534D48  # "WSMH"


def node_identity() -> str:
    """What two processes on one machine (one kernel boot) share, and processes elsewhere do not."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


@dataclass(frozen=True, kw_only=True)
class SlotLayout:
    """Where each tensor of a manifest lives inside a slot (64-byte aligned, manifest order)."""
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    slot_bytes: int
    chunk_bytes: int

    @staticmethod
    def for_sizes(sizes: Sequence[int], *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> "SlotLayout":
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        offsets, end = [], 0
        for size in sizes:
            start = -(-end // ALIGN) * ALIGN
            offsets.append(start)
            end = start + size
        slot = max(ALIGN, -(-end // ALIGN) * ALIGN)
        return SlotLayout(offsets=tuple(offsets), sizes=tuple(sizes), slot_bytes=slot, chunk_bytes=chunk_bytes)

    @property
    def n_chunks(self) -> int:
        return -(-self.slot_bytes // self.chunk_bytes)

    def chunk(self, i: int) -> tuple[int, int]:
        """[start, end) of chunk i within a slot."""
        return i * self.chunk_bytes, min(self.slot_bytes, (i + 1) * self.chunk_bytes)


class SharedSlots:
    """The mapped file: two slots of `layout.slot_bytes` (a uint8 tensor over shared memory)."""

    def __init__(self, buffer: Tensor, layout: SlotLayout, path: str):
        self.buffer, self.layout, self.path = buffer, layout, path

    def slot(self, s: int) -> Tensor:
        n = self.layout.slot_bytes
        return self.buffer[s * n:(s + 1) * n]

    def tensor_view(self, s: int, index: int, dtype: torch.dtype, shape: Sequence[int]) -> Tensor:
        off, size = self.layout.offsets[index], self.layout.sizes[index]
        return self.slot(s)[off:off + size].view(dtype).view(tuple(shape))


def _allreduce_min(pg, value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MIN
    pg.allreduce([t], opts).wait()
    return int(t[0])


def _has_room(nbytes: int) -> bool:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize >= nbytes + (64 << 20)   # leave room for everything else in it


def open_lane(store, pg, rank: int, sizes: Sequence[int], *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
              wanted: bool = True) -> SharedSlots | None:
    """Negotiate the lane on a formed group (a collective: every rank calls it with its plan's tensor
    sizes). Returns the mapped slots when every rank shares rank 0's node and /dev/shm has room,
    else None (the gloo lane). `wanted=False` on any rank forces the gloo lane."""
    layout = SlotLayout.for_sizes(sizes, chunk_bytes=chunk_bytes)
    if rank == 0:
        store.set("shm_lane/node", node_identity())
    same = store.get("shm_lane/node").decode() == node_identity()
    if _allreduce_min(pg, int(wanted and same and _has_room(2 * layout.slot_bytes))) == 0:
        return None
    total = 2 * layout.slot_bytes
    if rank == 0:
        path = os.path.join(SHM_DIR, f"alphagrpo-weights-{uuid.uuid4().hex}")
        with open(path, "wb") as f:
            f.truncate(total)
        store.set("shm_lane/path", path)
    path = store.get("shm_lane/path").decode()
    buffer = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
    if rank == 0:
        buffer.fill_(0)                         # allocate the pages now, not inside the first syncs
    _allreduce_min(pg, 1)                       # every rank has mapped it
    if rank == 0:
        os.unlink(path)                         # the mappings stay; the name goes
    return SharedSlots(buffer, layout, path)


# --------------------------------------------------------------------------- one sync

def send_shared(group, slots: SharedSlots, buckets: Iterator[list[Tensor]], manifest, sizes: Sequence[int]
                ) -> tuple[int, bool, float]:
    """Write `buckets` (full tensors in manifest order, `sizes` bytes each) into slot version % 2, hash
    it chunk by chunk and broadcast the digests. Returns (slot digest, every receiver verified, seconds).
    The slot digest is xxh3-64 over the chunk digests in order."""
    t0 = time.perf_counter()
    layout, s = slots.layout, manifest.version % 2
    if layout.sizes != tuple(sizes):
        raise ValueError("the shared slots were laid out for another plan (the lane was opened with other weights)")
    slot, index = slots.slot(s), 0
    for tensors in buckets:
        for t in tensors:
            off = layout.offsets[index]
            raw = byte_view(t)
            slot[off:off + raw.numel()].copy_(raw)
            index += 1
    if index != len(layout.sizes):
        raise RuntimeError(f"wrote {index} tensors, the plan has {len(layout.sizes)}")
    chunk_digests = torch.tensor([to_int64(WeightsHash().update(slot[a:b]).digest())
                                  for a, b in map(layout.chunk, range(layout.n_chunks))], dtype=torch.int64)
    group.broadcast(torch.tensor([MAGIC, manifest.version, manifest.digest(), s, layout.n_chunks],
                                 dtype=torch.int64))
    group.broadcast(chunk_digests)
    verified = _allreduce_min(group.pg, 1) == 1
    group.collectives += 1
    return WeightsHash().update(chunk_digests).digest(), verified, time.perf_counter() - t0


def receive_shared(group, slots: SharedSlots, params: Sequence[nn.Parameter], manifest, sizes: Sequence[int],
                   problem: str | None, *, sent_plan: int, slot_index: int, n_chunks: int
                   ) -> tuple[int, str | None]:
    """The receiving side of `send_shared`, after its header (read by the caller: the sender's plan
    digest, slot and chunk count; `problem` holds what the caller already found wrong). Hashes every
    chunk of the slot against the sender's digests, then points `params` at the slot (no copy). The
    closing all_reduce(MIN) of the verdicts tells the sender whether every receiver accepted.
    Returns (slot digest, problem or None)."""
    layout, s = slots.layout, slot_index
    if problem is None and (sent_plan != manifest.digest() or layout.sizes != tuple(sizes)
                            or n_chunks != layout.n_chunks):
        problem = "sender's bucket plan differs from the receiver's (digest/layout)"
    chunk_digests = torch.zeros(n_chunks, dtype=torch.int64)
    group.broadcast(chunk_digests)
    slot, bad = slots.slot(s), []
    if problem is None:
        for i in range(n_chunks):
            a, b = layout.chunk(i)
            if to_int64(WeightsHash().update(slot[a:b]).digest()) != int(chunk_digests[i]):
                bad.append(i)
    slot_digest = WeightsHash().update(chunk_digests).digest()
    if problem is None and bad:
        problem = f"chunks {bad[:5]} of the shared slot differ from the sender's digests"
    if problem is None and manifest.checksum is not None and manifest.checksum != slot_digest:
        problem = f"sender's checksum {slot_digest:#018x} != manifest checksum {manifest.checksum:#018x}"
    _allreduce_min(group.pg, int(problem is None))
    group.collectives += 1
    if problem is None:
        with torch.no_grad():
            for i, p in enumerate(params):
                view = slots.tensor_view(s, i, p.dtype, p.shape)
                if p.device.type == "cpu":
                    p.data = view          # no copy: the parameter lives in the slot
                else:
                    p.data.copy_(view)     # an accelerator replica keeps its own memory (one H2D copy)
    return slot_digest, problem
