"""Loss sensitivity of each singular direction of a low-rank update, gathered from a run's gradients.

What a direction of an update is worth is how much the loss depends on it. Write ``ΔW = s·B A`` as
``Σ_k σ_k u_k v_kᵀ``. Removing direction k changes the loss, to first order, by ``-σ_k·u_kᵀ G v_k``, where
``G = ∂L/∂W`` is the gradient at the adapted weight. ``I_k = |σ_k·u_kᵀ G v_k|`` is AdaLoRA's sensitivity
``|θ·∇_θ L|`` (Zhang et al. 2023, eq. 5), taken on the singular values of ``ΔW`` instead of on the entries of
``A`` and ``B``. So it does not depend on how ``B`` and ``A`` split the product: ``B M`` and ``M⁻¹A`` give the
same ``I`` for any invertible ``M``.

No d×k matrix is formed. With ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (thin QR), the SVD ``U Σ Vᵀ`` of the r×r core
``s·R_B R_Aᵀ`` gives ``u_k = Q_B U_k`` and ``v_k = Q_A V_k``. Since ``∂L/∂B = s·G Aᵀ``,
``G v_k = (∂L/∂B / s)·R_A⁻¹ V_k``.

One batch's ``I`` is noisy. As in AdaLoRA (eqs. 8-9), the score smooths it and weights it by its uncertainty:
``Ī ← β₁Ī + (1-β₁)I``, ``Ū ← β₂Ū + (1-β₂)|I - Ī|``, score ``Ī·Ū``. Directions are indexed in σ order at each
step. DoRA's ``G`` is the gradient at its unnormalised direction matrix, so the score there is that matrix's.
"""

from __future__ import annotations

import torch

from .report import LowRankUpdate, lora_layers, split_update


def direction_sensitivity(update: LowRankUpdate, grad_A: torch.Tensor, grad_B: torch.Tensor) -> torch.Tensor:
    """``|σ_k·u_kᵀ G v_k|`` for the singular directions of ``update`` (σ descending), from its factors' gradients."""
    A, B = update.lora_A.detach().double(), update.lora_B.detach().double()
    scale = abs(update.scaling)
    if scale == 0:
        return torch.zeros(A.shape[0], dtype=torch.float64)
    q_b, r_b = torch.linalg.qr(B)
    _, r_a = torch.linalg.qr(A.T)
    u, sigma, vh = torch.linalg.svd(scale * (r_b @ r_a.T))
    # u_kᵀ G v_k = U_kᵀ Q_Bᵀ (∂L/∂B / s) R_A⁻¹ V_k; pinv: A may lose rank (then those σ are 0 anyway)
    core_grad = q_b.T @ grad_B.detach().double() @ torch.linalg.pinv(r_a) / scale
    projection = (u.T @ core_grad @ vh.T).diagonal()
    return (sigma * projection).abs()


def gradient_updates(model: torch.nn.Module) -> list[tuple[LowRankUpdate, torch.Tensor, torch.Tensor]]:
    """``(update, ∂L/∂A, ∂L/∂B)`` of every adapted module (fused modules split into their slices) whose factors
    hold gradients now; call it between ``backward`` and the optimizer step."""
    out = []
    for name, layer, adapter, spec in lora_layers(model):
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if A.grad is None or B.grad is None:
            continue
        weights = split_update(name, A.detach(), B.detach(), float(layer.scaling[adapter]), None, None, spec)
        grads = split_update(name, A.grad, B.grad, 1.0, None, None, spec)  # only their factors are read
        out += [(w, g.lora_A, g.lora_B) for w, g in zip(weights, grads)]
    return out


class SensitivityTracker:
    """Smoothed sensitivity ``Ī·Ū`` per module and direction, updated from the gradients after each backward.

    ``update(model)`` between ``loss.backward()`` and ``optimizer.step()``;
    ``scores()`` -> ``{module or module[slice]: [score of direction 1, 2, …]}`` (σ order).
    """

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85):
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= beta < 1:
                raise ValueError(f"{name}={beta} must be in [0, 1).")
        self.beta1, self.beta2 = beta1, beta2
        self.steps = 0
        self._mean: dict[str, torch.Tensor] = {}
        self._uncertainty: dict[str, torch.Tensor] = {}

    def update(self, model: torch.nn.Module) -> None:
        pairs = gradient_updates(model)
        if not pairs:
            return
        self.steps += 1
        for update, grad_A, grad_B in pairs:
            name, value = update.name, direction_sensitivity(update, grad_A, grad_B)
            mean = self.beta1 * self._mean.get(name, 0.0) + (1 - self.beta1) * value
            uncertainty = self.beta2 * self._uncertainty.get(name, 0.0) + (1 - self.beta2) * (value - mean).abs()
            self._mean[name], self._uncertainty[name] = mean, uncertainty

    def scores(self) -> dict[str, list[float]]:
        return {name: (mean * self._uncertainty[name]).tolist() for name, mean in self._mean.items()}

    def to_json(self) -> dict:
        return {"beta1": self.beta1, "beta2": self.beta2, "steps": self.steps, "scores": self.scores()}
