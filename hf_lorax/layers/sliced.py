"""``B`` of a LoRA on slices of a fused projection: a plain dense ``nn.Linear`` whose off-slice entries never train.

A module adapted on ``n`` slices of rank ``r`` is exactly a rank ``n*r`` LoRA whose ``B`` is block-structured:
slice ``i``'s rows times columns ``i*r:(i+1)*r``. :class:`SlicedLoraB` holds that dense ``B`` as its ``weight``
(a real parameter: state dicts, peft saving and hotswap, transformers' ``load_adapter`` and
``add_weighted_adapter`` all see standard LoRA state) and a fixed boolean ``slice_mask`` buffer that is not
saved. The forward uses ``where(mask, weight, weight.detach())``: the values are the weight's own (the layer
computes what a plain peft LoRA with this ``B`` computes), the gradient is zero off the blocks, so AdamW's moments
and updates there stay exactly zero and the blocks' zeros stay zeros. It is one elementwise op on an
``out × n·r`` matrix, traced by ``torch.compile`` like any other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SlicedLoraB(nn.Linear):
    """A bias-free ``nn.Linear(n·r, out)`` whose entries outside ``slice_mask`` get no gradient.

    Slice ``i`` adapts the output rows ``rows[i]`` with columns ``i*r:(i+1)*r``.
    """

    def __init__(self, out_features: int, rows: list[list[int]], r: int, device=None):
        # the weight stays on meta until PlannedLayerMixin._use_slices sets it to peft's B: no init, so no random
        # numbers drawn and a seeded run draws what plain peft draws
        super().__init__(len(rows) * r, out_features, bias=False, device="meta")
        mask = torch.zeros(out_features, len(rows) * r, dtype=torch.bool, device=device)
        for i, idx in enumerate(rows):
            mask[torch.as_tensor(idx, dtype=torch.long, device=device), i * r : (i + 1) * r] = True
        self.register_buffer("slice_mask", mask, persistent=False)  # derived from the config, never saved
        self.adapted_entries = sum(map(len, rows)) * r  # the trained entries (counted from the rows: works on meta too)

    def trained_weight(self) -> torch.Tensor:
        """The weight's values, with the gradient flowing only into the adapted blocks."""
        return torch.where(self.slice_mask, self.weight, self.weight.detach())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.trained_weight())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        dense = state_dict.get(prefix + "weight")
        if dense is not None and tuple(dense.shape) == tuple(self.slice_mask.shape) and not dense.is_meta:
            if dense.masked_fill(self.slice_mask.to(dense.device), 0).abs().max() > 0:  # non-zero off the blocks
                error_msgs.append(f"{prefix}weight has non-zero entries outside the adapted slices, so it is "
                                  "not a fused-slice adapter of this layout; load it without fused_slices (as a "
                                  "plain LoRA on the whole module).")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, adapted={self.adapted_entries}/{self.slice_mask.numel()}"


def trained_numel(module: nn.Module) -> int:
    """Trainable entries of an adapter submodule: a sliced ``B`` counts only its blocks."""
    return module.adapted_entries if isinstance(module, SlicedLoraB) else sum(map(torch.numel, module.parameters()))


def trained_parameter_count(model: nn.Module) -> int:
    """Entries that train: parameters requiring grad, a sliced ``B`` counted by its blocks (the paper's count)."""
    sliced = {id(m.weight): m.adapted_entries for m in model.modules() if isinstance(m, SlicedLoraB)}
    return sum(sliced.get(id(p), p.numel()) for p in model.parameters() if p.requires_grad)


def b_weight(lora_B: nn.Module) -> torch.Tensor:
    """The ``B`` weight a forward should multiply with: masked-gradient for sliced ``B``, else the weight."""
    return lora_B.trained_weight() if isinstance(lora_B, SlicedLoraB) else lora_B.weight
