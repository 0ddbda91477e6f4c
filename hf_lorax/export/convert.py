"""The tensor math of an export: per-module scaling baked into ``B``, zero-padding to one rank, DoRA to LoRA.

Every function here is exact except :func:`dora_to_lowrank`, which returns its relative error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def bake_and_pad(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
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


@dataclass
class LowRankFit:
    """The best rank-``rank`` LoRA ``B A`` of a dense update, and how far from it it is."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    relative_error: float  # ‖ΔW − B A‖_F / ‖ΔW‖_F


def best_lowrank(delta: torch.Tensor, rank: int) -> LowRankFit:
    """Truncated SVD of ``delta`` (out, in): ``B = U_k S_k``, ``A = V_kᵀ`` (Eckart–Young: the best rank-k fit)."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, S.numel())
    total = float(S.square().sum())
    residual = float(S[k:].square().sum())
    A = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    B = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    A[:k], B[:, :k] = Vh[:k], U[:, :k] * S[:k]
    return LowRankFit(lora_A=A, lora_B=B, relative_error=(residual / total) ** 0.5 if total > 0 else 0.0)


def dora_to_lowrank(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    magnitude: torch.Tensor, rank: int) -> LowRankFit:
    """The best rank-``rank`` plain LoRA of a DoRA module's update ``W' − W`` (``weight`` is (out, in))."""
    return best_lowrank(dora_weight(weight, lora_A, lora_B, scaling, magnitude) - weight.double(), rank)
