"""LoRA+ (Hayou et al. 2024): train ``B`` with a larger learning rate than ``A``.

peft ships ``create_loraplus_optimizer``, but it puts every 1-D trainable parameter into B's group, so
the classifier head's biases and DoRA's magnitude vectors silently get ``lr * ratio`` (16x by default).
This helper scales only the LoRA ``B`` factors and leaves everything else at ``lr``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def loraplus_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float = 16.0,
                          weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+: B factors at ``lr * loraplus_lr_ratio``, the rest at ``lr``.

    Weight decay applies to matrices only (not to biases, norms or DoRA magnitudes).
    """
    if not loraplus_lr_ratio >= 1 or math.isinf(loraplus_lr_ratio):  # ``not >=`` catches NaN
        raise ValueError(f"loraplus_lr_ratio={loraplus_lr_ratio} must be a finite number >= 1 "
                         "(LoRA+ trains B faster than A).")
    if not 0 < lr < math.inf:
        raise ValueError(f"lr={lr} must be a finite number > 0.")
    if not 0 <= weight_decay < math.inf:
        raise ValueError(f"weight_decay={weight_decay} must be a finite number >= 0.")
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_b = any(marker in f".{name}." for marker in (".lora_B.", ".lora_embedding_B."))
            decays = param.ndim >= 2 and "magnitude" not in name
            groups.setdefault((is_b, decays), []).append(param)
    if not groups:
        raise ValueError("The model has no trainable parameters; build it with hf_lorax.get_model first.")
    return [{"params": params, "lr": lr * (loraplus_lr_ratio if is_b else 1.0),
             "weight_decay": weight_decay if decays else 0.0} for (is_b, decays), params in sorted(groups.items())]


def create_loraplus_optimizer(model: nn.Module, lr: float, loraplus_lr_ratio: float = 16.0, weight_decay: float = 0.0,
                              optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                              **optimizer_kwargs: Any) -> torch.optim.Optimizer:
    """Build a LoRA+ optimizer; pass it to ``Trainer(optimizers=(optimizer, None))``.

    Example::

        optimizer = hf_lorax.create_loraplus_optimizer(model, lr=2e-4, loraplus_lr_ratio=16)
        trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(optimizer, None))

    On CUDA, ``optimizer_cls=bitsandbytes.optim.PagedAdamW8bit`` gives a paged 8-bit optimizer.
    """
    return optimizer_cls(loraplus_param_groups(model, lr, loraplus_lr_ratio, weight_decay), lr=lr, **optimizer_kwargs)
