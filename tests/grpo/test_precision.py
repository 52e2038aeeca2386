"""grpo.precision: fp32 LoRA masters keep 1e-6 updates that bf16 masters round away."""
import torch
from torch import nn

from grpo.precision import keep_trainable_fp32


def _lora_model():
    from peft import LoraConfig, inject_adapter_in_model  # heavy import, only here

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16)
    return inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]), base)


def _apply_tiny_updates(param, n=50, step=1e-6):
    with torch.no_grad():
        for _ in range(n):
            param.add_(step)


def test_trainable_params_cast_to_fp32_and_base_stays_bf16():
    model = _lora_model()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all("lora_" in n for n in trainable)
    assert keep_trainable_fp32(model) == 4
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert keep_trainable_fp32(model) == 0  # idempotent


def test_existing_grads_are_cast_with_their_params():
    """A bf16 .grad already there (a backward before the cast) becomes fp32 with the same values."""
    model = _lora_model()
    model(torch.randn(3, 16, dtype=torch.bfloat16)).float().square().mean().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g.dtype == torch.bfloat16 for g in before.values())
    assert any(g.abs().sum() > 0 for g in before.values())  # lora_B grads (lora_A's are 0: B starts at 0)
    keep_trainable_fp32(model)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32, name
            assert torch.equal(p.grad, before[name].float()), name


def test_small_updates_accumulate_in_fp32_but_vanish_in_bf16():
    bf16_model, fp32_model = _lora_model(), _lora_model()
    keep_trainable_fp32(fp32_model)
    p_bf16 = dict(bf16_model.named_parameters())["0.lora_A.default.weight"]
    p_fp32 = dict(fp32_model.named_parameters())["0.lora_A.default.weight"]
    big = p_bf16.detach().abs() > 1e-2  # where bf16 spacing (>= 6e-5) dwarfs a 1e-6 step
    assert big.any()
    before_bf16, before_fp32 = p_bf16.detach().clone(), p_fp32.detach().clone()
    _apply_tiny_updates(p_bf16)
    _apply_tiny_updates(p_fp32)
    assert torch.equal(p_bf16.detach()[big], before_bf16[big])  # every update rounded away
    moved = (p_fp32.detach() - before_fp32)[big]
    assert torch.allclose(moved, torch.full_like(moved, 5e-5), rtol=5e-2)  # fp32 rounding of 50 adds


def test_forward_and_backward_run_with_bf16_base_and_fp32_lora():
    model = _lora_model()
    keep_trainable_fp32(model)
    out = model(torch.randn(3, 16, dtype=torch.bfloat16))
    assert out.shape == (3, 4) and out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
