"""QLoRA / QDoRA on a bitsandbytes 4-bit base, on CPU (CUDA-only checks are marked and skipped here)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import gpt2_config, randomize_adapters, roberta_config
from datasets import Dataset
from peft import get_peft_model_state_dict
from transformers import (
    BitsAndBytesConfig,
    GPT2LMHeadModel,
    RobertaForSequenceClassification,
    Trainer,
    TrainingArguments,
)
from transformers.pytorch_utils import Conv1D

import hf_lorax
from hf_lorax import QLoRAConfig, get_model
from hf_lorax.layers.bnb import LoraLinear4bit

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("qbases")
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config(n_embd=64)).save_pretrained(root / "gpt2")
    RobertaForSequenceClassification(roberta_config(hidden_size=64, intermediate_size=128)).save_pretrained(root / "roberta")
    return {"gpt2": str(root / "gpt2"), "roberta": str(root / "roberta")}


def _config(bases, arch, dora, **kw):
    kw.setdefault("compute_dtype", "float32")
    if arch == "gpt2":
        return QLoRAConfig(base_model_name_or_path=bases["gpt2"], task_type="CAUSAL_LM", r=4, lora_alpha=8,
                           target_modules=["c_attn", "c_fc"], fused_slices={"c_attn": ["q", "v"]}, use_dora=dora,
                           rank_map={"h.1.*": 2}, **kw)
    return QLoRAConfig(base_model_name_or_path=bases["roberta"], task_type="SEQ_CLS", num_labels=2, r=4, lora_alpha=8,
                       target_modules=["query", "value"], use_dora=dora, **kw)


def _data(arch, n=32, seq=10):
    ids = torch.randint(3, 96, (n, seq), generator=torch.Generator().manual_seed(0))
    labels = ids.tolist() if arch == "gpt2" else (ids[:, 1] > 48).long().tolist()
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels})


ARCHS, DORA = ("gpt2", "roberta"), (False, True)
# the plain-peft reload of every trained case, in one process that never imports hf_lorax (argv: a JSON list of
# [base, adapter, AutoModel class, ids file, output file]); a case that fails writes its error instead of its output
PLAIN_PEFT_RELOAD = textwrap.dedent("""
    import json, os, sys, traceback
    sys.modules["hf_lorax"] = None
    import torch, transformers
    from peft import PeftModel
    for base_dir, adapter, auto, ids, out in json.loads(sys.argv[1]):
        try:
            q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
                                                llm_int8_skip_modules=["classifier", "lm_head"])
            base = getattr(transformers, auto).from_pretrained(base_dir, quantization_config=q, dtype=torch.float32)
            model = PeftModel.from_pretrained(base, adapter).eval()
            # Same kernel as the trained model: bitsandbytes' AVX512-BF16 repacked path rounds differently (~1e-3).
            for m in model.modules():
                if hasattr(m, "support_avx512bf16_for_cpu"):
                    m.support_avx512bf16_for_cpu = False
            with torch.no_grad():
                torch.save(model(torch.load(ids)).logits, out)
        except Exception:
            with open(out + ".error", "w") as f:
                f.write(traceback.format_exc())
    os._exit(0)  # all written; the interpreter's teardown of torch and transformers takes seconds
""")


def _train_with_eval_and_save(arch, dora, bases, folder, input_ids):
    model = get_model(_config(bases, arch, dora))
    assert any(isinstance(m, LoraLinear4bit) for m in model.modules())
    args = TrainingArguments(output_dir=str(folder / "run"), max_steps=6, eval_strategy="steps", eval_steps=2,
                             per_device_train_batch_size=8, learning_rate=1e-2, report_to=[], use_cpu=True,
                             disable_tqdm=True, save_strategy="no", logging_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=_data(arch), eval_dataset=_data(arch, n=16))
    trainer.train()  # evaluation between training steps must not break training (AVX512-BF16 repacking)
    assert sum("eval_loss" in e for e in trainer.state.log_history) == 3
    model.eval()
    with torch.no_grad():
        torch.save(model(input_ids).logits, folder / "expected.pt")
    model.save_pretrained(folder / "adapter")
    torch.save(input_ids, folder / "ids.pt")
    auto = "AutoModelForCausalLM" if arch == "gpt2" else "AutoModelForSequenceClassification"
    return [bases[arch], str(folder / "adapter"), auto, str(folder / "ids.pt"), str(folder / "out.pt")]


@pytest.fixture(scope="module")
def trained(bases, tmp_path_factory):
    """Every (arch, dora) case trained here (what failed: its exception, raised by the case's test), then all the
    saved adapters reloaded by plain peft in ONE new process (it starts torch, transformers and peft once)."""
    results, reloads = {}, []
    for arch in ARCHS:
        for dora in DORA:
            folder = tmp_path_factory.mktemp(f"{arch}-{dora}")
            torch.manual_seed(1)  # the input_ids fixture's
            input_ids = torch.randint(3, 96, (2, 12))
            try:
                reloads.append(_train_with_eval_and_save(arch, dora, bases, folder, input_ids))
                results[arch, dora] = folder
            except Exception as exc:  # re-raised by the case's test
                results[arch, dora] = exc
    if reloads:
        proc = subprocess.run([sys.executable, "-c", PLAIN_PEFT_RELOAD, json.dumps(reloads)], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        results["process"] = proc
    return results


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dora", DORA, ids=["qlora", "qdora"])
def test_train_with_eval_save_and_plain_peft_reload(arch, dora, trained):
    folder = trained[arch, dora]
    if isinstance(folder, Exception):
        raise folder
    proc = trained["process"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (folder / "out.pt.error").exists(), (folder / "out.pt.error").read_text()[-3000:]
    torch.testing.assert_close(torch.load(folder / "out.pt"), torch.load(folder / "expected.pt"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dora", [False, True], ids=["qlora", "qdora"])
def test_merge_and_unload_dequantizes(quant_type, dora, bases, input_ids, tmp_path):
    model = get_model(_config(bases, "gpt2", dora, quant_type=quant_type))
    randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()  # restores the quantized layer exactly
        assert isinstance(model.base_model.model.transformer.h[0].attn.c_attn.base_layer, bnb.nn.Linear4bit)
        torch.testing.assert_close(model(input_ids).logits, expected, atol=0, rtol=0)
        merged = hf_lorax.merge_and_unload(model)
        assert type(merged.transformer.h[0].attn.c_attn) is Conv1D  # GPT-2's own layer again, dense
        assert merged.transformer.h[0].attn.c_attn.weight.dtype == torch.float32
        torch.testing.assert_close(merged(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
    # dense throughout, the layers no adapter touched (c_proj) too, and no config claiming 4-bit weights: the saved
    # model reloads as a plain one, and with a BitsAndBytesConfig as a 4-bit one
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    merged.save_pretrained(tmp_path)
    with torch.no_grad():
        dense = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(dense(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        assert GPT2LMHeadModel.from_pretrained(tmp_path, quantization_config=q)(input_ids).logits.isfinite().all()


def test_a_model_peft_builds_merges_dense_too(bases, input_ids, tmp_path):
    """peft.get_peft_model (the path TRL takes) with an hf_lorax QLoRA config: it trains on after an evaluation
    (bitsandbytes' CPU repacking is off on every 4-bit layer, those no adapter wraps too), its own merge_and_unload is
    dense throughout too, and the saved model reloads as a plain one."""
    import pickle

    from peft import get_peft_model

    config = _config(bases, "gpt2", False)
    base = GPT2LMHeadModel.from_pretrained(bases["gpt2"], **config.base_model_kwargs())
    model = get_peft_model(base, config)
    with torch.no_grad():
        model.eval()(input_ids)
    for _ in range(2):
        model.train()(input_ids, labels=input_ids).loss.backward()
    assert pickle.loads(pickle.dumps(type(model.base_model))) is type(model.base_model)  # torch.save(model) works
    randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids).logits
        merged = model.merge_and_unload()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    merged.save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(reloaded(input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_merged_export_of_a_qlora_adapter_loads_as_a_plain_model(bases, tmp_path, input_ids):
    """export --merge of a 4-bit adapter writes a dense model that transformers loads without quantization, equal to
    the trained model (its task head included)."""
    from hf_lorax.export import export_adapter

    model = get_model(_config(bases, "roberta", False))
    randomize_adapters(model)
    model.eval().save_pretrained(tmp_path / "a")
    export_adapter(str(tmp_path / "a"), str(tmp_path / "m"), "vllm", merge=True)
    merged = RobertaForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, model(input_ids).logits, atol=1e-5, rtol=1e-5)


def test_bf16_compute_and_reload_with_get_model(bases, tmp_path, input_ids):
    model = get_model(_config(bases, "roberta", True, compute_dtype="bfloat16"))
    randomize_adapters(model)
    model.eval()
    model.save_pretrained(tmp_path)
    sidecar = json.loads((tmp_path / "hf_lorax.json").read_text())
    assert sidecar["config_class"] == "QLoRAConfig" and sidecar["compute_dtype"] == "bfloat16"
    assert "quant_type" not in json.loads((tmp_path / "adapter_config.json").read_text())
    again = get_model(str(tmp_path), is_trainable=False)
    assert isinstance(again.peft_config["default"], QLoRAConfig)
    assert any(isinstance(m, LoraLinear4bit) for m in again.modules())
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids).logits, model(input_ids).logits, atol=1e-2, rtol=1e-2)
    # onto an unquantized base too (to serve it in bf16, as with plain peft): dense layers, the saved adapter
    dense = get_model(str(tmp_path), model=RobertaForSequenceClassification.from_pretrained(bases["roberta"]),
                      is_trainable=False)
    assert not any(isinstance(m, LoraLinear4bit) for m in dense.modules())
    saved = get_peft_model_state_dict(model)
    assert saved.keys() == get_peft_model_state_dict(dense).keys()
    for key, value in get_peft_model_state_dict(dense).items():
        torch.testing.assert_close(value.float(), saved[key].float())


def test_frozen_base_keeps_its_dtype(bases):
    model = get_model(_config(bases, "roberta", False, compute_dtype="bfloat16"))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    assert torch.float32 not in frozen  # no blanket fp32 upcast (peft#3265)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(quant_type="int4"), "quant_type='int4'"),
        (dict(compute_dtype="float64"), "compute_dtype='float64'"),
        (dict(quant_storage="int2"), "quant_storage='int2'"),
    ],
)
def test_invalid_quantization_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QLoRAConfig(target_modules=["q"], **kwargs)


def test_model_without_quantized_linears(tiny_roberta):
    with pytest.raises(ValueError, match="no bitsandbytes-quantized linear layers"):
        get_model(QLoRAConfig(task_type="SEQ_CLS", num_labels=2, target_modules=["query"]), model=tiny_roberta)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_qlora_step(bases):
    model = get_model(_config(bases, "gpt2", True, compute_dtype="bfloat16"), device_map={"": 0})
    ids = torch.randint(3, 96, (4, 16), device="cuda")
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
