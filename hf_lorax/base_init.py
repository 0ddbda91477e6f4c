"""peft initialisations that change the base weights, and why an engine then serves the adapter wrong.

peft's ``LoraLayer.update_layer`` runs these ``init_lora_weights`` on the base layer: PiSSA, OLoRA, CorDA and
LoRA-GA subtract ``s·B0A0`` from ``W``, LoftQ replaces ``W`` with a quantized ``Q(W)``. The adapter is then
trained against the changed base, and ``s·BA`` added to the original ``W`` is not the trained model. peft converts
the first four to a LoRA of the original base when it saves them (:data:`CONVERSION`); hf_lorax says so where it
refuses one.
"""

from __future__ import annotations

CHANGES = {"pissa": "W − s·B0A0, the top singular directions moved into the adapter",
           "olora": "W − s·B0A0, from a QR decomposition of W", "corda": "W − s·B0A0, from context-oriented SVD",
           "lora_ga": "W − s·B0A0, from gradient SVD", "loftq": "a quantized Q(W) chosen together with B0A0"}
CONVERTIBLE_INITS = ("pissa", "olora", "corda", "lora_ga")
# peft's exact conversion, ΔW = s·(BA − B0A0) at rank 2r, from the adapter saved right after initialisation (peft's
# PiSSA / OLoRA / CorDA examples save it with init_lora_weights=True); plain LoRA modules only
CONVERSION = ("save the trained model with model.save_pretrained(OUT, path_initial_model_for_weight_conversion="
              "INIT_DIR) (peft's exact conversion to a LoRA of the original base, rank 2r; INIT_DIR: the adapter saved "
              "right after initialisation)")
# DoRA's weight norm was taken on the changed base, so s·(BA − B0A0) is not a DoRA adapter's update (measured: logits
# 0.27 off on a tiny Llama) and peft converts it without a warning; hf_lorax's save refuses it
NO_DORA_CONVERSION = ("No LoRA of the original base reproduces it: DoRA's weight norm was taken on the changed base, "
                      "and peft's conversion (path_initial_model_for_weight_conversion) is exact for plain LoRA only")
# peft runs these again when it loads the adapter onto the original base (deterministic: no sampling, no data),
# which rebuilds the changed base; the others (pissa_niter_*, corda, lora_ga, loftq) it cannot rebuild
PEFT_REBUILT_INITS = ("pissa", "olora")


def base_changing_init(init) -> str | None:
    """``init`` (an ``init_lora_weights`` value) if that initialisation changed the base, else None."""
    return init if isinstance(init, str) and init.lower().startswith(tuple(CHANGES)) else None


def reload_problem(init, dora: bool = False) -> str | None:
    """Why an adapter trained with ``init`` (an ``init_lora_weights`` value) does not load as it was trained, and the
    way out; None when it does (the base was not changed, or peft rebuilds it). Loading a saved adapter runs its
    initialisation again on the original base (peft ``update_layer``): randomized SVD, data-driven and quantized
    initialisations do not rebuild the base the adapter was trained on."""
    init = base_changing_init(init)
    if init is None or init.lower() in PEFT_REBUILT_INITS:
        return None
    family = init_family(init)
    fix = ("load it onto the quantized base it was trained with" if family not in CONVERTIBLE_INITS else
           f"merge it (merge_and_unload) where it was trained, or use another initialisation ({NO_DORA_CONVERSION})"
           if dora else f"save the adapter as initialised, before training (INIT_DIR, as peft's PiSSA / CorDA "
           f"examples do); after training, {CONVERSION}, and load OUT")
    return (f"init_lora_weights={init!r} changes the base ({CHANGES[family]}), and loading the saved adapter runs "
            f"that initialisation again: it does not rebuild the same base. Instead, {fix}.")


def init_family(init: str) -> str:
    """``"pissa_niter_4"`` -> ``"pissa"``: the entry of :data:`CHANGES` an ``init_lora_weights`` value belongs to."""
    return next(name for name in CHANGES if init.lower().startswith(name))


def base_change_reason(init: str, engine_label: str, dora: bool = False) -> str:
    """Why ``engine_label`` would serve an adapter trained with ``init`` wrong, and what fixes it."""
    family = init_family(init)
    head = (f"init_lora_weights={init!r} trained this adapter against a changed base ({CHANGES[family]}); "
            f"{engine_label} adds it to the original weights.")
    if dora and family in CONVERTIBLE_INITS:
        return f"{head} {NO_DORA_CONVERSION}."
    if family in CONVERTIBLE_INITS:
        return head + f" To serve it, {CONVERSION}, and export or serve OUT."
    return head + " No LoRA of the original base reproduces it: serve it on the LoftQ base it was trained with."
