"""Every place hf_lorax touches peft's or transformers' internals, and nothing else.

Each touch is declared as an :class:`~hf_lorax.integrations.guard.InternalAPI`: what it is, why hf_lorax
needs it, the library versions it was verified against and the signature it expects. A hook (a wrapper
around a library method) is installed by :func:`hf_lorax.integrations.hooks.install` only when the installed version is inside the
verified range *and* the signature still matches; otherwise it stays off and a ``UserWarning`` says which
hook, why, and what still works without it (:func:`hf_lorax.get_model` needs none of them: it resolves the
adapter plan itself and hands peft an exact config). ``tests/test_integrations.py`` fails as soon as a
signature changes.

=================================================  =====================================================
hook                                               why
=================================================  =====================================================
peft ``LoraModel._prepare_model``                  ``peft.get_peft_model(model, LoRAConfig(...))`` and
                                                   ``PeftModel.from_pretrained`` with an hf_lorax config:
                                                   resolve rank maps / slices / head before peft
                                                   injects layers (peft has no public pre-injection hook)
peft ``PeftConfigMixin.from_pretrained``           rebuild the hf_lorax config an ``hf_lorax.json`` beside
                                                   ``adapter_config.json`` describes (compact fused slices)
transformers ``PeftAdapterMixin.load_adapter``     transformers 5.x drops saved DoRA magnitudes (maps the
                                                   key to ``...lora_magnitude_vector.<name>``): copy them in
transformers ``CallbackHandler.on_log``            a callback cannot add metrics to a ``Trainer.log`` call
                                                   before the reporting callbacks see it (no public API)
=================================================  =====================================================

Layers subclass peft's ``lora.Linear`` / ``lora.Embedding`` / ``LoraVariant`` through
``LoraConfig._register_custom_module`` (peft's documented, experimental custom-layer API); the private
helpers they need are imported from :mod:`hf_lorax.integrations.peft_api` only.

Modules: ``guard`` (version ranges, signature checks), ``peft_api`` (peft internals as small functions),
``peft_hooks`` and ``transformers_hooks`` (the hooks), ``hooks`` (:func:`install`, run by ``import hf_lorax``),
``sharding`` (whole tensors of DeepSpeed ZeRO-3 and FSDP2 parameters; ``deepspeed.zero.GatheredParameters``).
"""
