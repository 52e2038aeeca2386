"""Precision of trainable weights under bf16 compute."""
from __future__ import annotations

import torch
from torch import nn


def keep_trainable_fp32(model: nn.Module) -> int:
    """Cast every parameter with requires_grad (e.g. the LoRA A/B matrices) to fp32, in place.

    The frozen base stays bf16 for compute; the trainable weights are fp32 master weights. With a
    lr of ~5e-5 and clipped gradients, one update is ~1e-6 of a weight of ~1e-2, below bf16's
    spacing there (~6e-5): bf16 masters round every update away, training silently stalls and the
    reward collapses (reported by Flow-GRPO). peft's LoRA layers cast the bf16 activations to the
    adapter's dtype and the result back, so the forward still runs.

    Call before building the optimizer (its state takes the parameters' dtype). Existing .grad
    tensors are cast too. Returns the number of parameter tensors that were cast.
    """
    n_cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            if param.grad is not None:
                param.grad = param.grad.float()
            n_cast += 1
    return n_cast
