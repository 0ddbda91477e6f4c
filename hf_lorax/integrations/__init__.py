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
peft ``LoraModel.inject_adapter`` (set on          ``peft.get_peft_model``, ``add_adapter``,
``LoraModel`` only)                                ``PeftModel.from_pretrained``, transformers
                                                   ``add_adapter`` / ``load_adapter``,
                                                   ``add_weighted_adapter``, TRL: hand peft the resolved
                                                   copy of an hf_lorax config (peft reads
                                                   ``self.peft_config[name]`` first thing and has no public
                                                   pre-injection hook); the user's object is untouched
peft ``PeftConfigMixin.from_pretrained``           a local folder with ``hf_lorax.json`` loads as its
                                                   resolved hf_lorax config (no network request)
transformers ``PeftAdapterMixin.load_adapter``     transformers 5.x drops saved DoRA magnitudes (maps the
                                                   key to ``...lora_magnitude_vector.<name>``): copy them in,
                                                   for hf_lorax folders only
=================================================  =====================================================

Every hook passes configs and folders that are not hf_lorax's through unchanged: code that does not use
hf_lorax runs as without it (``tests/test_isolation.py``). ``hf_lorax.hotswap_adapter`` uses peft's public
hotswap and peft's ``_update_scaling`` (declared here too).

Layers subclass peft's ``lora.Linear`` / ``lora.Embedding`` / ``LoraVariant`` through
``LoraConfig._register_custom_module`` (peft's documented, experimental custom-layer API); the private
helpers they need are imported from :mod:`hf_lorax.integrations.peft_api` only.

Modules: ``guard`` (version ranges, signature checks), ``peft_api`` (peft internals as small functions),
``peft_hooks`` and ``transformers_hooks`` (the hooks), ``hooks`` (:func:`install`, run by ``import hf_lorax``),
``sharding`` (whole tensors of DeepSpeed ZeRO-3 and FSDP2 parameters; ``deepspeed.zero.GatheredParameters``).
"""
