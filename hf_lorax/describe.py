"""``describe(model)``: what is adapted, with which rank and alpha, and what it costs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from .integrations.peft_api import LoraLayer, is_wrapped_head
from .layers.sliced import trained_numel
from .slices import slice_alpha, slice_rank
from .task_types import task_name


@dataclass
class AdaptedModule:
    module: str
    layer: str
    method: str
    r: int
    alpha: float
    scaling: float
    params: int
    slices: str = ""


@dataclass
class AdapterReport:
    """Rows of :func:`describe`; ``print(report)`` shows an aligned table, ``to_markdown()`` a markdown one."""

    adapter: str
    rows: list[AdaptedModule] = field(default_factory=list)
    adapter_params: int = 0
    trainable_params: int = 0
    total_params: int = 0
    heads: dict[str, int] = field(default_factory=dict)  # modules trained in full besides the adapters: params
    targets: str = ""  # target_modules, and where they came from (the user, or peft's default for the architecture)
    loss: str = ""  # causal LMs: the logits-free loss, or the model's own and why

    def to_dict(self) -> dict:
        return asdict(self)

    def _table(self) -> tuple[list[str], list[list[str]]]:
        head = ["module", "layer", "method", "r", "alpha", "scaling", "params"]
        body = [[r.module, r.layer, r.method + (f"[{r.slices}]" if r.slices else ""), str(r.r), f"{r.alpha:g}",
                 f"{r.scaling:.4g}", f"{r.params:,}"] for r in self.rows]
        return head, body

    def summary(self) -> str:
        text = f"adapter {self.adapter!r}: {len(self.rows)} modules, {self.adapter_params:,} adapter params"
        pct = 100 * (self.trainable_params or self.adapter_params) / max(self.total_params, 1)
        if self.trainable_params:
            text += f"; trainable {self.trainable_params:,} of {self.total_params:,} ({pct:.4f}%)"
        else:  # a reloaded adapter (is_trainable=False): say so, not "trainable 0 of N (0.0000%)"
            text += (f" ({pct:.4f}% of {self.total_params:,}); inference mode (frozen): nothing trainable, "
                     "load with is_trainable=True to train it")
        heads = ", ".join(f"{name} ({n:,} params)" for name, n in self.heads.items())
        for label, value in (("trained in full besides the adapters", heads), ("targets", self.targets),
                             ("loss", self.loss)):
            if value:
                text += f"\n{label}: {value}"
        return text

    def __str__(self) -> str:
        head, body = self._table()
        widths = [max(map(len, column)) for column in zip(head, *body)]

        def fmt(row: list[str]) -> str:  # the numbers (r, alpha, scaling, params) right-aligned
            return "  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

        return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body), "", self.summary()])

    def to_markdown(self) -> str:
        head, body = self._table()
        if all(not row[1] for row in body):  # layer types are unknown when read from a saved adapter
            head, body = [head[0], *head[2:]], [[row[0], *row[2:]] for row in body]
        return markdown_table(head, body)


def markdown_table(head, body) -> str:
    """A markdown table of the ``head`` row and the ``body`` rows (cells as given)."""
    rows = ["| " + " | ".join(map(str, row)) + " |" for row in [head, *body]]
    return "\n".join([rows[0], "|" + "---|" * len(head), *rows[1:]])


def describe(model: nn.Module, adapter: str | None = None) -> AdapterReport:
    """Per-module table of an adapted model: module, layer type, method, r, alpha, scaling, parameters.

    For a fused-slice module, ``r`` and ``alpha`` are per slice and ``method`` lists the slices, e.g.
    ``lora[q,v]``.

    Example::

        >>> print(hf_lorax.describe(model))
        module                                   layer   method  r  alpha  scaling  params
        ...
    """
    adapter = adapter or _active_adapter(model)
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.r:
            continue
        spec = getattr(module, "slice_specs", {}).get(adapter)
        n = len(spec.adapt) if spec else 1
        containers = [getattr(module, attr, None) or {} for attr in module.adapter_layer_names]
        items = [c[adapter] for c in containers if adapter in c]
        rows.append(AdaptedModule(
            module=name.removeprefix("base_model.model."), layer=type(module.get_base_layer()).__name__,
            method="dora" if adapter in module.lora_magnitude_vector else "lora", r=slice_rank(module.r[adapter], n),
            alpha=slice_alpha(module.lora_alpha[adapter], n, module.use_rslora.get(adapter)),
            scaling=float(module.scaling[adapter]), slices=",".join(spec.adapt) if spec else "",
            # a sliced B counts its trained blocks only
            params=sum(p.numel() if isinstance(p, nn.Parameter) else trained_numel(p) for p in items)))
    heads = {  # modules_to_save: trained in full
        name.removeprefix("base_model.model."): sum(p.numel() for p in head.modules_to_save[adapter].parameters())
        for name, head in model.named_modules() if is_wrapped_head(head) and adapter in head.modules_to_save}
    return AdapterReport(adapter=adapter, rows=rows, adapter_params=sum(row.params for row in rows), heads=heads,
                         trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                         total_params=sum(p.numel() for p in model.parameters()), targets=_targets(model, adapter),
                         loss=_loss(model))


def _targets(model: nn.Module, adapter: str) -> str:
    config = getattr(model, "peft_config", {}).get(adapter)
    if config is None:
        return ""
    targets = config.target_modules
    shown = repr(sorted(targets) if isinstance(targets, (set, list, tuple)) else targets)
    default_for = getattr(getattr(config, "resolved_plan", None), "default_targets_for", None)  # hf_lorax's plan
    return shown + (f" (peft's default for model_type {default_for!r})" if default_for is not None else "")


def _loss(model: nn.Module) -> str:
    """Which training loss a causal LM computes (:func:`hf_lorax.loss.training_loss`)."""
    from .loss import training_loss

    config = getattr(model, "peft_config", {}).get(_active_adapter(model))
    task = task_name(getattr(config, "task_type", None))
    if task == "SEQ_2_SEQ_LM":
        return "the model's own (the logits-free loss covers decoder-only causal LMs)"
    return training_loss(model) if task == "CAUSAL_LM" else ""


def _active_adapter(model: nn.Module) -> str:
    active = getattr(model, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        active = active[0]
    return active or "default"

