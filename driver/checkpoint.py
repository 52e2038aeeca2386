"""A run's checkpoints: written whole or not at all, verified before they are trusted.

    runs/<name>/checkpoints/step-000012/
        driver.json            the driver's state: steps done, policy version, each lane's stream
                               position (the first group not yet trained) and counters
        trainable.safetensors  the trainable weights under the model's names (the LoRA adapter with LoRA on)
        learner/               each learner rank's DeepSpeed state (weights and optimizer, ZeRO-partitioned)
                               or, in sync mode, optimizer.safetensors + optimizer.json
        policy/                with run.checkpoint_merged: the policy with LoRA folded in (a checkpoint
                               folder `policy.checkpoint=` loads)
        manifest.json          every other file's size and xxh3-64, written last

A checkpoint is assembled in step-000012.tmp/, every file fsynced, the manifest written, then the folder
renamed (an atomic rename on one filesystem): a crash leaves a .tmp folder, never a half checkpoint
under the final name. Loading checks every file against the manifest and refuses a missing, resized
or changed one, naming it. The last `run.keep_checkpoints` are kept. On a multi-node cluster the run
folder must be on storage every learner node shares (cluster/README.md).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch import nn

MANIFEST = "manifest.json"
DRIVER = "driver.json"
TRAINABLE = "trainable.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, partial or corrupted; the message names the file."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _digest(path: Path) -> str:
    h = xxhash.xxh3_64()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def begin(root: Path, step: int) -> Path:
    """The temporary folder a checkpoint of `step` is assembled in (a stale one from a crash is cleared)."""
    tmp = step_dir(root, step).with_name(step_dir(root, step).name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, *, keep: int) -> Path:
    """Fsync every file, write the manifest, rename the folder to its final name; keep the last `keep`."""
    manifest = {}
    for f in _files(tmp):
        _fsync(f)
        manifest[str(f.relative_to(tmp))] = {"bytes": f.stat().st_size, "xxh3": _digest(f)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    _fsync(tmp / MANIFEST)
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _fsync(final.parent)
    for old in complete(final.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def complete(root: Path) -> list[Path]:
    """The checkpoints under `root` that were committed (renamed to their final name), oldest first;
    `verify` decides whether one is intact (a .tmp folder is an unfinished one and never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))


def verify(folder: Path) -> dict[str, Any]:
    """The manifest, after checking every file it lists (present, same size, same hash) and that no file
    was added; CheckpointError naming the first file that is not as written."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{path}: missing (a checkpoint that was not finished; its folder is not usable)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    for rel, want in manifest.items():
        f = folder / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in {MANIFEST} but missing")
        if f.stat().st_size != want["bytes"]:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, {MANIFEST} says {want['bytes']} (truncated or changed)")
        if _digest(f) != want["xxh3"]:
            raise CheckpointError(f"{f}: contents differ from {MANIFEST} (xxh3 {want['xxh3']}): corrupted")
    extra = [str(f.relative_to(folder)) for f in _files(folder) if str(f.relative_to(folder)) not in manifest]
    if extra:
        raise CheckpointError(f"{folder / extra[0]}: not in {MANIFEST} (added after the checkpoint was written)")
    return manifest


def resolve(resume: str, root: Path) -> Path | None:
    """`run.resume`: "never" -> None; "auto" -> the latest finished checkpoint (None if there is none);
    a path -> that checkpoint. Whatever is chosen is verified (a corrupted one is refused, not skipped)."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete(root)
        if not found:
            return None
        chosen = found[-1]
    else:
        chosen = Path(resume)
        if not chosen.is_dir():
            raise CheckpointError(f"run.resume={resume!r}: no such checkpoint folder")
    verify(chosen)
    return chosen


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def save_trainable(model: nn.Module, path: Path) -> None:
    """The trainable weights by name (safetensors; the LoRA adapter when LoRA is on)."""
    from safetensors.torch import save_file
    save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}, str(path))


def load_trainable(model: nn.Module, path: Path) -> None:
    """Load `save_trainable`'s file into the model's trainable weights, every name and shape checked."""
    from safetensors.torch import load_file
    state = load_file(str(path))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    bad = [n for n in params.keys() & state.keys() if params[n].shape != state[n].shape]
    if missing or extra or bad:
        raise CheckpointError(f"{path}: does not match the model's trainable weights (missing {missing[:5]}, "
                              f"unexpected {extra[:5]}, shape {bad[:5]})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.dtype))


def save_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    """A torch optimizer's state as safetensors (tensors) + JSON (the rest): no pickle."""
    from safetensors.torch import save_file
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "optimizer.safetensors"))
    write_json(folder / "optimizer.json", {"param_groups": sd["param_groups"], "scalars": scalars})


def load_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    from safetensors.torch import load_file
    tensors = load_file(str(folder / "optimizer.safetensors"))
    meta = read_json(folder / "optimizer.json")
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class Checkpointer:
    """When and where a run checkpoints, and what the driver writes into each (the trainers add the
    learner's state and the weights through callbacks)."""

    def __init__(self, root: Path, *, every: int, keep: int, merged: bool) -> None:
        self.root, self.every, self.keep, self.merged = Path(root), every, keep, merged
        self.last: Path | None = None
        self.last_step = -1

    def due(self, steps_done: int) -> bool:
        return self.every > 0 and steps_done % self.every == 0 and steps_done != self.last_step

    def save(self, steps_done: int, *, driver: dict, learner, trainable, policy=None) -> Path:
        """Assemble and commit checkpoint `steps_done`: driver.json from `driver`; `learner(folder)` writes
        the optimizer state (and weights) into folder/learner; `trainable(path)` the trainable weights;
        `policy(folder)` the merged policy, with run.checkpoint_merged."""
        tmp = begin(self.root, steps_done)
        write_json(tmp / DRIVER, driver)
        (tmp / "learner").mkdir()
        learner(tmp / "learner")
        trainable(tmp / TRAINABLE)
        if self.merged and policy is not None:
            policy(tmp / "policy")
        self.last, self.last_step = commit(tmp, keep=self.keep), steps_done
        return self.last
