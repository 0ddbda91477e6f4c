"""Every place hf_lorax touches peft's or transformers' internals, and nothing else.

Each touch is declared as an :class:`~hf_lorax.integrations.guard.InternalAPI`: what it is, why hf_lorax
needs it, the library versions it was verified against and the signature it expects. A hook (a wrapper
around a library method) is installed by :func:`hf_lorax.hooks.install` only when the installed version is inside the
verified range *and* the signature still matches; otherwise it stays off and a ``UserWarning`` says which
hook, why, and what still works without it (:func:`hf_lorax.get_model` needs none of them: it resolves the
adapter plan itself and hands peft an exact config). ``tests/test_integrations.py`` fails as soon as a
signature changes.

The hooks themselves are listed in :mod:`hf_lorax.hooks`.

Every hook passes configs and folders that are not hf_lorax's through unchanged: code that does not use
hf_lorax runs as without it (``tests/test_isolation.py``). ``hf_lorax.hotswap_adapter`` uses peft's public
hotswap and peft's ``_update_scaling`` (declared here too).

Layers subclass peft's ``lora.Linear`` / ``lora.Embedding`` / ``LoraVariant`` through
``LoraConfig._register_custom_module`` (peft's documented, experimental custom-layer API); the private
helpers they need are imported from :mod:`hf_lorax.integrations.peft_api` only.

Modules: ``guard`` (version ranges, signature checks), ``peft_api`` and ``transformers_api`` (the internals as small
functions, and the declarations of those :mod:`hf_lorax.hooks` wraps: the hooks live at the top of the package, since
they call into it), ``sharding`` (whole tensors of DeepSpeed ZeRO-3 and FSDP2 parameters; ``deepspeed.zero.GatheredParameters``).
"""
