"""Spectral statistics of low-rank updates ``ΔW = s·B A``, computed from the factors.

The LoRA paper (§7) finds that ``ΔW`` has a very low intrinsic rank. These functions measure it without
forming the d×k matrix: with ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (thin QR), ``ΔW = s·Q_B (R_B R_Aᵀ) Q_Aᵀ``,
so the singular values of ``ΔW`` are those of the r×r core ``s·R_B R_Aᵀ``.
"""

from __future__ import annotations

import torch


def factor_singular_values(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Singular values (descending, float64) of ``scaling * lora_B @ lora_A``; ``A`` is (r, in), ``B`` (out, r)."""
    A, B = lora_A.detach().double(), lora_B.detach().double()
    _, r_b = torch.linalg.qr(B)
    _, r_a = torch.linalg.qr(A.T)
    return torch.linalg.svdvals(abs(scaling) * (r_b @ r_a.T))


def effective_rank(singular_values: torch.Tensor) -> float:
    """``exp`` of the entropy of the L1-normalised spectrum (Roy & Vetterli 2007); 0 for a zero update."""
    s = singular_values.double().clamp_min(0)
    total = s.sum()  # entr(p) = -p·log p, 0 at p = 0
    return 0.0 if total <= 0 else float(torch.exp(torch.special.entr(s / total).sum()))


def stable_rank(singular_values: torch.Tensor) -> float:
    """``‖ΔW‖_F² / σ_max²``; 0 for a zero update."""
    s = singular_values.double()
    top = float(s.max()) if s.numel() else 0.0
    return float((s**2).sum()) / top**2 if top > 0 else 0.0


def energy(singular_values: torch.Tensor) -> list[float]:
    """Cumulative energy: fraction of ``‖ΔW‖_F²`` captured by the top-k singular values, k = 1..r."""
    sq = singular_values.double() ** 2
    total = float(sq.sum())
    return [0.0] * sq.numel() if total <= 0 else (sq.cumsum(0) / total).tolist()


def energy_rank(singular_values: torch.Tensor, threshold: float = 0.9) -> int:
    """Smallest k whose top-k singular values hold ``threshold`` of the energy (0 for a zero update)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold} must be in (0, 1].")
    cumulative = energy(singular_values)
    if not cumulative or cumulative[-1] == 0:
        return 0
    return next(k for k, e in enumerate(cumulative, start=1) if e >= threshold - 1e-12)


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int | None = None, j: int | None = None) -> float:
    """Normalised subspace similarity φ(A₁, A₂, i, j) of the LoRA paper (§7.2, eq. 4).

    ``‖U_{A₁}^{i}ᵀ U_{A₂}^{j}‖_F² / min(i, j)`` with ``U^{i}`` the top-i right-singular vectors of ``A``
    (rows of ``A`` are (r, in)). 1 when the subspaces coincide, 0 when they are orthogonal.
    """
    U1, U2 = (torch.linalg.svd(A.detach().double(), full_matrices=False)[2] for A in (A1, A2))
    i = U1.shape[0] if i is None else i
    j = U2.shape[0] if j is None else j
    if not (1 <= i <= U1.shape[0] and 1 <= j <= U2.shape[0]):
        raise ValueError(f"i={i}, j={j} must be within 1..{U1.shape[0]} and 1..{U2.shape[0]}.")
    return float(((U1[:i] @ U2[:j].T) ** 2).sum() / min(i, j))


def subspace_similarity_grid(A1: torch.Tensor, A2: torch.Tensor) -> list[list[float]]:
    """φ(A₁, A₂, i, j) for every i ≤ r₁, j ≤ r₂ (the paper's Figure 3 grid)."""
    return [[subspace_similarity(A1, A2, i, j) for j in range(1, A2.shape[0] + 1)] for i in range(1, A1.shape[0] + 1)]
