"""peft initialisations that change the base weights, and why an engine then serves the adapter wrong.

peft's ``LoraLayer.update_layer`` runs these ``init_lora_weights`` on the base layer: PiSSA, OLoRA, CorDA and
LoRA-GA subtract ``s·B0A0`` from ``W``, LoftQ replaces ``W`` with a quantized ``Q(W)``. The adapter is then
trained against the changed base, and ``s·BA`` added to the original ``W`` is not the trained model.
:mod:`hf_lorax.export.initial` converts the first four to a LoRA of the original base.
"""

from __future__ import annotations

CHANGES = {"pissa": "W − s·B0A0, the top singular directions moved into the adapter",
           "olora": "W − s·B0A0, from a QR decomposition of W", "corda": "W − s·B0A0, from context-oriented SVD",
           "lora_ga": "W − s·B0A0, from gradient SVD", "loftq": "a quantized Q(W) chosen together with B0A0"}
BASE_CHANGING_INITS = tuple(CHANGES)
CONVERTIBLE_INITS = ("pissa", "olora", "corda", "lora_ga")
# peft runs these again when it loads the adapter onto the original base (deterministic: no sampling, no data),
# which rebuilds the changed base; the others (pissa_niter_*, corda, lora_ga, loftq) it cannot rebuild
PEFT_REBUILT_INITS = ("pissa", "olora")


def base_changing_init(config: dict) -> str | None:
    """The ``init_lora_weights`` of an adapter config if that initialisation changed the base, else None."""
    init = config.get("init_lora_weights")
    return init if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS) else None


def init_family(init: str) -> str:
    """``"pissa_niter_4"`` -> ``"pissa"``: the entry of :data:`CHANGES` an ``init_lora_weights`` value belongs to."""
    return next(name for name in CHANGES if init.lower().startswith(name))


def base_change_reason(init: str, engine_label: str) -> str:
    """Why ``engine_label`` would serve an adapter trained with ``init`` wrong, and what fixes it."""
    family = init_family(init)
    head = (f"init_lora_weights={init!r} trained this adapter against a changed base ({CHANGES[family]}); "
            f"{engine_label} adds it to the original weights.")
    if family in CONVERTIBLE_INITS:
        return head + (" Export with --initial_adapter INIT_DIR (the adapter saved right after initialisation, "
                       "before training) to convert it exactly to a LoRA of the original base.")
    return head + " No LoRA of the original base reproduces it: serve it on the LoftQ base it was trained with."
