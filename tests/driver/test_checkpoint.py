"""Checkpoints: written whole or not at all, refused when damaged (naming the file), the last K kept,
and the optimizer's state saved without pickle and restored exactly."""
import json

import pytest
import torch

from driver.checkpoint import (MANIFEST, CheckpointError, begin, commit, complete, load_optimizer, load_trainable,
                               resolve, save_optimizer, save_trainable, verify)


def _write(root, step, payload=b"weights"):
    tmp = begin(root, step)
    (tmp / "driver.json").write_text(json.dumps({"step": step}))
    (tmp / "learner").mkdir()
    (tmp / "learner" / "state.bin").write_bytes(payload * 100)
    return tmp


def test_commit_is_atomic_keeps_the_last_k_and_resolves_the_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        final = commit(_write(root, step), keep=2)
        assert final.name == f"step-{step:06d}" and not final.with_name(final.name + ".tmp").exists()
    assert [p.name for p in complete(root)] == ["step-000003", "step-000004"]
    partial = _write(root, 5)                              # a crash before commit: never chosen
    assert partial.name.endswith(".tmp") and resolve("auto", root).name == "step-000004"
    manifest = json.loads((root / "step-000004" / MANIFEST).read_text())
    assert set(manifest) == {"driver.json", "learner/state.bin"} and manifest["learner/state.bin"]["bytes"] == 700
    assert resolve("never", root) is None and resolve("auto", tmp_path / "none") is None
    assert resolve(str(root / "step-000003"), root).name == "step-000003"
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve(str(root / "step-000009"), root)


@pytest.mark.parametrize("damage, words", [
    ("flip", "contents differ from manifest.json"), ("truncate", "bytes, manifest.json says 700"),
    ("delete", "listed in manifest.json but missing"), ("add", "not in manifest.json"),
    ("manifest", "manifest.json: missing")])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage, words):
    final = commit(_write(tmp_path, 7), keep=3)
    target = final / "learner" / "state.bin"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[100] ^= 1
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-5] + b"x")      # 696 bytes
        target.write_bytes(target.read_bytes()[:-1])
    elif damage == "delete":
        target.unlink()
    elif damage == "add":
        target = final / "extra.bin"
        target.write_bytes(b"?")
    else:
        target = final / MANIFEST
        target.unlink()
    with pytest.raises(CheckpointError, match=words) as e:
        resolve("auto", tmp_path)                          # refused, not skipped for an older one
    assert str(target) in str(e.value)
    if damage != "manifest":
        with pytest.raises(CheckpointError):
            verify(final)


def test_optimizer_and_trainable_weights_round_trip_and_training_continues_identically(tmp_path):
    torch.manual_seed(0)

    def model_and_opt():
        m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        m[0].bias.requires_grad_(False)                    # a frozen tensor is not a trainable weight
        return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)

    def step(m, opt, seed):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        opt.step()

    a, opt_a = model_and_opt()
    for s in range(3):
        step(a, opt_a, s)
    save_trainable(a, tmp_path / "trainable.safetensors")
    save_optimizer(opt_a, tmp_path / "opt")
    b, opt_b = model_and_opt()
    with torch.no_grad():
        b[0].bias.copy_(a[0].bias)
    load_trainable(b, tmp_path / "trainable.safetensors")
    load_optimizer(opt_b, tmp_path / "opt")
    for s in range(3, 6):
        step(a, opt_a, s)
        step(b, opt_b, s)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    wrong = torch.nn.Linear(4, 4)
    with pytest.raises(CheckpointError, match="does not match the model's trainable weights"):
        load_trainable(wrong, tmp_path / "trainable.safetensors")
