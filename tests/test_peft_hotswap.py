"""peft's own ``hotswap_adapter`` on hf_lorax adapters equals loading the adapter directly (issue 33, item 2).

peft 0.21 gives every module ``lora_alpha / r`` on a hotswap; the hook (:mod:`hf_lorax.hooks`)
sets each module's own scaling when the adapter swapped in or the model's adapter is an hf_lorax one, and leaves
plain peft adapters to peft. Each test below with the hook removed (``__wrapped__``) shows what it fixes.
"""

import shutil
import subprocess
import sys
import textwrap

import peft.utils.hotswap
import pytest
import torch
from conftest import build_gpt2, randomize_adapters
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.hotswap import hotswap_adapter  # bound by name, as peft's docs show

from hf_lorax import LoRAConfig, get_model
from hf_lorax.config import SIDECAR_NAME
from hf_lorax.integrations.guard import installed_hooks
from hf_lorax.integrations.peft_api import HOTSWAP_FROM_STATE_DICT

CONFIGS = {
    "maps": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], rank_map={"h.1.*": 2},
                 alpha_map={"h.0.attn.c_proj": 2}),
    "slices-maps": dict(r=2, lora_alpha=8, target_modules=["c_attn", "c_proj"], fused_slices={"c_attn": ["q", "v"]},
                        rank_map={"h.1.attn.c_attn": 4}, alpha_map={"h.0.attn.c_proj": 32}),
}


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_hotswap")
    for kind, kwargs in CONFIGS.items():
        for seed in (1, 2):
            model = get_model(LoRAConfig(task_type="CAUSAL_LM", **kwargs), model=build_gpt2())
            randomize_adapters(model, seed=seed)
            model.save_pretrained(root / f"{kind}-{seed}")
    plain = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                       rank_pattern={"h.1.attn.c_attn": 2}, alpha_pattern={"h.0.attn.c_proj": 2})
    for seed in (1, 2):
        model = get_peft_model(build_gpt2(), plain)
        randomize_adapters(model, seed=seed)
        model.save_pretrained(root / f"plain-{seed}")
    return root


def _swap(first, second, ids, unhooked=False, monkeypatch=None):
    model = PeftModel.from_pretrained(build_gpt2(), first)
    if unhooked:  # peft as it ships
        original = peft.utils.hotswap.hotswap_adapter_from_state_dict.__wrapped__
        monkeypatch.setattr(peft.utils.hotswap, "hotswap_adapter_from_state_dict", original)
    hotswap_adapter(model, str(second), adapter_name="default", torch_device="cpu")
    if unhooked:
        monkeypatch.undo()
    return _logits(model, ids)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_peft_hotswap_of_an_hf_lorax_adapter_equals_loading_it(kind, adapters, input_ids, monkeypatch):
    first, second = adapters / f"{kind}-1", adapters / f"{kind}-2"
    direct = _logits(PeftModel.from_pretrained(build_gpt2(), second), input_ids)
    assert (_logits(PeftModel.from_pretrained(build_gpt2(), first), input_ids) - direct).abs().max() > 1e-2
    assert (_swap(first, second, input_ids) - direct).abs().max() < 1e-5
    assert (_swap(first, second, input_ids, unhooked=True, monkeypatch=monkeypatch) - direct).abs().max() > 1e-2


def test_a_plain_folder_swapped_into_an_hf_lorax_model_is_right_too(adapters, input_ids, tmp_path):
    """The model's adapter is hf_lorax's; the incoming folder is plain peft (no hf_lorax.json, e.g. from the Hub)."""
    second = tmp_path / "second"
    shutil.copytree(adapters / "maps-2", second)
    (second / SIDECAR_NAME).unlink()
    direct = _logits(PeftModel.from_pretrained(build_gpt2(), adapters / "maps-2"), input_ids)
    assert (_swap(adapters / "maps-1", second, input_ids) - direct).abs().max() < 1e-5


def test_plain_peft_adapters_swap_exactly_as_peft_wrote_it(adapters, input_ids, monkeypatch):
    first, second = adapters / "plain-1", adapters / "plain-2"
    hooked = _swap(first, second, input_ids)
    assert torch.equal(hooked, _swap(first, second, input_ids, unhooked=True, monkeypatch=monkeypatch))
    direct = _logits(PeftModel.from_pretrained(build_gpt2(), second), input_ids)
    assert (hooked - direct).abs().max() > 1e-3  # peft's own bug, left to peft (hf_lorax.hotswap_adapter fixes it)


def test_imported_before_hf_lorax_is_reached_too(adapters):
    """``from peft.utils.hotswap import hotswap_adapter`` before ``import hf_lorax``: the same function object, fixed
    because it looks ``hotswap_adapter_from_state_dict`` up in its module at every call."""
    script = textwrap.dedent("""
        import sys, torch
        from peft.utils.hotswap import hotswap_adapter
        from peft import PeftModel
        from transformers import GPT2Config, GPT2LMHeadModel
        import hf_lorax  # noqa: F401
        def base():
            torch.manual_seed(0)
            return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=64,
                                              bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
        ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            direct = PeftModel.from_pretrained(base(), sys.argv[2]).eval()(input_ids=ids).logits
            model = PeftModel.from_pretrained(base(), sys.argv[1]).eval()
            hotswap_adapter(model, sys.argv[2], adapter_name="default", torch_device="cpu")
            print((model(input_ids=ids).logits - direct).abs().max().item())
    """)
    out = subprocess.run([sys.executable, "-c", script, str(adapters / "slices-maps-1"), str(adapters / "slices-maps-2")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


def test_the_hook_is_installed_with_the_verified_signature():
    assert HOTSWAP_FROM_STATE_DICT.problem() is None
    assert installed_hooks()[HOTSWAP_FROM_STATE_DICT.path] is True
