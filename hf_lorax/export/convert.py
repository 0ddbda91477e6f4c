"""The tensor math of an export: per-module scaling baked into ``B``, zero-padding to one rank, DoRA to LoRA.

Every function here is exact except :func:`dora_to_lowrank`, which returns its relative error.
"""

from __future__ import annotations

import torch


def bake_and_pad(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A', B')`` of rank ``rank`` with ``B' A' = scaling · B A`` exactly: zero rows of ``A``, zero columns of ``B``.

    An engine that applies scaling 1 (``lora_alpha = r``) then computes the module's own update. ``rank`` is at least
    the module's rank (the export refuses a smaller ``--rank`` first).
    """
    r = lora_A.shape[0]
    A = torch.zeros(rank, lora_A.shape[1], dtype=lora_A.dtype)
    B = torch.zeros(lora_B.shape[0], rank, dtype=lora_B.dtype)
    A[:r] = lora_A
    B[:, :r] = (lora_B.double() * scaling).to(lora_B.dtype)
    return A, B


def dora_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's effective weight ``m / ‖W + s·BA‖_row ⊙ (W + s·BA)`` in float64 (``weight`` is (out, in))."""
    combined = weight.double() + scaling * (lora_B.double() @ lora_A.double())
    return magnitude.double().view(-1, 1) / combined.norm(dim=1, keepdim=True) * combined


def dora_to_lowrank(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    magnitude: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` plain LoRA ``(A, B)`` of a DoRA module's update ``ΔW = W' − W`` (``weight`` is
    (out, in)), in float64, and its relative error ``‖ΔW − B A‖_F / ‖ΔW‖_F``.

    A truncated SVD of ``ΔW``: ``B = U_k S_k``, ``A = V_kᵀ`` (Eckart–Young: the best rank-k fit), zero-padded to
    ``rank`` when ``ΔW`` has fewer singular values.
    """
    delta = dora_weight(weight, lora_A, lora_B, scaling, magnitude) - weight.double()
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.numel())
    total, residual = float(S.square().sum()), float(S[k:].square().sum())
    A = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    B = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    A[:k], B[:, :k] = Vh[:k], U[:, :k] * S[:k]
    return A, B, (residual / total) ** 0.5 if total > 0 else 0.0
