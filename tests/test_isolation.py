"""Importing hf_lorax changes nothing for code that does not use it (case 7), the Hub sidecar fetch (case 6), and
models that pickle across processes (case 8)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import gpt2_config, randomize_adapters
from test_cli import CHATTER, SITECUSTOMIZE
from transformers import GPT2LMHeadModel

import hf_lorax
from hf_lorax import DoRAConfig, LoRAConfig, get_model

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}


def _run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


# -- case 7 ---------------------------------------------------------------------------------------------------

PLAIN_WORKFLOW = textwrap.dedent("""
    import hashlib, json, sys
    if sys.argv[1] == "with":
        import hf_lorax  # noqa: F401
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    out = sys.argv[2]
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=64)
    def base():
        torch.manual_seed(0)
        return GPT2LMHeadModel(config)
    model = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], use_dora=True,
                                              lora_dropout=0.1, rank_pattern={"h.1.attn.c_attn": 2}))
    rows = torch.randint(3, 96, (8, 12), generator=torch.Generator().manual_seed(1)).tolist()
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(out + "/run", max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                             report_to=[], use_cpu=True, save_strategy="no", seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    model.save_pretrained(out + "/adapter")
    ids = torch.tensor(rows[:2])
    peft_loaded = PeftModel.from_pretrained(base(), out + "/adapter").eval()
    transformers_loaded = base()
    transformers_loaded.load_adapter(out + "/adapter")
    transformers_loaded.eval()
    with torch.no_grad():
        tensors = [peft_loaded(input_ids=ids).logits, transformers_loaded(input_ids=ids).logits]
    tensors += [p.detach() for _, p in sorted(model.named_parameters())]
    digest = hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in tensors)).hexdigest()
    history = [{k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k}
               for h in trainer.state.log_history]
    saved = json.load(open(out + "/adapter/adapter_config.json"))
    saved["target_modules"] = sorted(saved["target_modules"])  # a set: its order follows the process's hash seed
    files = {"adapter_config.json": saved}
    print(json.dumps({"digest": digest, "history": history, "files": files,
                      "peft_config": type(peft_loaded.peft_config["default"]).__name__}))
""")


SNAPSHOT = textwrap.dedent("""
    import importlib, inspect, json
    MODULES = ["peft", "peft.config", "peft.peft_model", "peft.mapping", "peft.tuners.tuners_utils",
               "peft.tuners.lora.model", "peft.tuners.lora.layer", "peft.utils.hotswap", "peft.utils.save_and_load",
               "transformers.trainer", "transformers.trainer_callback", "transformers.integrations.peft",
               "transformers.modeling_utils"]
    def snapshot():
        seen = {}
        for name in MODULES:
            module = importlib.import_module(name)
            for attr, value in vars(module).items():
                seen[f"{name}.{attr}"] = id(value)
                if inspect.isclass(value) and value.__module__ == name:
                    for key, member in vars(value).items():
                        seen[f"{name}.{attr}.{key}"] = id(member)
        return seen
    before = snapshot()
    import hf_lorax  # noqa: F401
    after = snapshot()
    print(json.dumps(sorted(k for k in before.keys() | after.keys() if after.get(k) != before.get(k))))
""")


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    """The plain peft workflow in a process without hf_lorax and in one that imports it first, both with the
    simulated third-party import chatter of tests/test_cli.py on. The process without hf_lorax then takes the
    snapshot of :data:`SNAPSHOT` around ``import hf_lorax``, its first (was a process of its own: one start-up of
    torch, transformers and peft fewer). Returns ``{which: CompletedProcess}``."""
    tmp_path = tmp_path_factory.mktemp("plain_runs")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), ENV["PYTHONPATH"]])}
    env.pop("HF_LORAX_DEBUG", None)
    scripts = {"without": PLAIN_WORKFLOW + SNAPSHOT, "with": PLAIN_WORKFLOW}
    return {which: subprocess.run([sys.executable, "-c", script, which, str(tmp_path / which)], capture_output=True,
                                  text=True, timeout=300, env=env) for which, script in scripts.items()}


def test_plain_peft_and_trainer_run_bit_identically_with_hf_lorax_imported(plain_runs):
    """A user's program that imports hf_lorax first still shows what its libraries print at import (was the control
    tests/test_cli.py::test_the_simulated_chatter_shows_when_a_program_imports_hf_lorax, a process of its own)."""
    for proc in plain_runs.values():
        assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {which: json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"digest"')))
            for which, proc in plain_runs.items()}
    assert runs["with"] == runs["without"]
    assert runs["with"]["peft_config"] == "LoraConfig"
    out = plain_runs["with"].stderr + plain_runs["with"].stdout
    assert all(line in out for line in CHATTER), plain_runs["with"].stderr[-3000:]


def test_import_patches_only_the_guarded_methods(plain_runs):
    """Everything ``import hf_lorax`` changes in peft and transformers, in the process that ran the plain workflow
    without it (the snapshot is its last line)."""
    proc = plain_runs["without"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    changed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert changed == [
        "peft.config.PeftConfigMixin.from_pretrained",  # reads hf_lorax.json of local hf_lorax folders only
        "peft.tuners.lora.model.LoraModel.inject_adapter",  # resolves hf_lorax configs only (LoRA tuners only)
        "peft.utils.hotswap.hotswap_adapter_from_state_dict",  # module scalings of hf_lorax adapters only
        "transformers.integrations.peft.PeftAdapterMixin.load_adapter",  # DoRA magnitudes of hf_lorax folders only
    ], changed
    from transformers.trainer_callback import CallbackHandler

    assert not hasattr(CallbackHandler.on_log, "__wrapped__")  # no Trainer-wide logging hook


def test_rank_utilization_metrics_reach_reporters_when_attached(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Reporter(TrainerCallback):  # stands for TensorBoard / W&B: a callback before the user's
        seen: list = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs))

    torch.manual_seed(0)
    model = get_model(LoRAConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"]),
                      model=GPT2LMHeadModel(gpt2_config()))
    rows = torch.randint(3, 96, (4, 8)).tolist()
    args = TrainingArguments(tmp_path / "run", max_steps=2, per_device_train_batch_size=2, logging_steps=100,
                             report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows],
                      callbacks=[Reporter()])
    callback = hf_lorax.RankUtilizationCallback(every_n_steps=1, plot=False).attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    assert sum("rank_utilization/mean" in logs for logs in Reporter.seen) == 2
    assert sum("rank_utilization/mean" in h for h in trainer.state.log_history) == 2


def test_an_unattached_callback_says_the_reporters_miss_its_metrics(tmp_path, caplog):
    from transformers import Trainer, TrainingArguments

    model = get_model(LoRAConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"]),
                      model=GPT2LMHeadModel(gpt2_config()))
    rows = torch.randint(3, 96, (2, 8)).tolist()
    args = TrainingArguments(tmp_path / "run", max_steps=1, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no")
    callback = hf_lorax.RankUtilizationCallback(every_n_steps=1, plot=False)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows],
                      callbacks=[callback])
    args.report_to = ["tensorboard"]  # as configured (tensorboard itself is not installed here)
    with caplog.at_level("WARNING", logger="hf_lorax.analysis.callback"):
        trainer.train()
    assert "not tensorboard" in caplog.text and ".attach(trainer)" in caplog.text
    assert any("rank_utilization/mean" in h for h in trainer.state.log_history)  # log_history still has them


# -- case 6 ---------------------------------------------------------------------------------------------------


class FakeHub:
    """Serves a local adapter folder as Hub repo ``user/adapter`` and records every download."""

    def __init__(self, folder):
        self.folder, self.calls = folder, []

    def download(self, repo_id, filename, subfolder=None, **kwargs):
        from huggingface_hub.errors import EntryNotFoundError

        self.calls.append((filename, {k: v for k, v in kwargs.items() if k != "user_agent"}))
        path = os.path.join(self.folder, filename)
        if not os.path.isfile(path):
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return path

    def install(self, monkeypatch):
        import functools

        import huggingface_hub
        import peft.config
        import peft.utils.save_and_load

        # the real signature: peft picks the download options out of its kwargs by it
        download = functools.wraps(huggingface_hub.hf_hub_download)(lambda *a, **kw: self.download(*a, **kw))
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
        monkeypatch.setattr(peft.config, "hf_hub_download", download)
        monkeypatch.setattr(peft.utils.save_and_load, "hf_hub_download", download)
        monkeypatch.setattr(peft.utils.save_and_load, "file_exists",
                            lambda repo_id, filename, **kw: os.path.isfile(os.path.join(self.folder, filename)))


@pytest.fixture
def hub_folder(tmp_path):
    torch.manual_seed(0)
    model = get_model(DoRAConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"], fused_slices={"c_attn": ["q", "v"]}),
                      model=GPT2LMHeadModel(gpt2_config()))
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_plain_peft_hub_loads_make_no_extra_request(hub_folder, monkeypatch):
    from peft import LoraConfig, PeftConfig

    _, folder = hub_folder
    (folder / "hf_lorax.json").unlink()  # a plain peft adapter
    hub = FakeHub(folder)
    hub.install(monkeypatch)
    config = PeftConfig.from_pretrained("user/adapter", token="secret", revision="v1")
    assert type(config) is LoraConfig
    assert [name for name, _ in hub.calls] == ["adapter_config.json"]


def test_get_model_passes_hub_options_and_reads_the_sidecar(hub_folder, monkeypatch, input_ids):
    model, folder = hub_folder
    hub = FakeHub(folder)
    hub.install(monkeypatch)
    torch.manual_seed(0)
    loaded = get_model("user/adapter", model=GPT2LMHeadModel(gpt2_config()),
                       adapter_kwargs={"token": "secret", "revision": "v1", "cache_dir": "/tmp/c"})
    sidecar_calls = [kw for name, kw in hub.calls if name == "hf_lorax.json"]
    assert sidecar_calls == [{"token": "secret", "revision": "v1", "cache_dir": "/tmp/c"}]
    assert all(kw.get("token") == "secret" and kw.get("revision") == "v1" for _, kw in hub.calls)
    assert isinstance(loaded.peft_config["default"], DoRAConfig)
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=1e-5, rtol=1e-5)


def test_a_hub_adapter_whose_init_changed_the_base_is_refused_as_a_local_one(hub_folder, monkeypatch):
    """Loading runs the initialisation again on the base: one that does not rebuild it (randomized SVD) is refused
    for a Hub repo as for a local folder, before any weights are downloaded."""
    _, folder = hub_folder
    (folder / "hf_lorax.json").unlink()  # a plain peft adapter (its fused slices saved as full-module LoRA)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa_niter_2"}))
    hub = FakeHub(folder)
    hub.install(monkeypatch)
    with pytest.raises(ValueError, match="'user/adapter': init_lora_weights='pissa_niter_2' changes the base.*does "
                                         "not rebuild the same base"):
        get_model("user/adapter", model=GPT2LMHeadModel(gpt2_config()))
    assert "adapter_model.safetensors" not in [name for name, _ in hub.calls]


def test_sidecar_fetch_propagates_auth_errors_and_treats_missing_as_plain(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError

    from hf_lorax.adapter_files import fetch_sidecar

    def gated(*args, **kwargs):
        err = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(err, "401: access to user/private is restricted")
        raise err

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(GatedRepoError, match="restricted"):
        fetch_sidecar("user/private", token="wrong")

    def missing(*args, **kwargs):
        raise EntryNotFoundError("no hf_lorax.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    assert fetch_sidecar("user/plain") is None


# -- case 8 ---------------------------------------------------------------------------------------------------

LOAD_PICKLED = textwrap.dedent("""
    import json, sys, torch
    names = []
    for model_path, io_path in zip(sys.argv[1::2], sys.argv[2::2]):
        model = torch.load(model_path, weights_only=False)
        ids, expected = torch.load(io_path)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)
        names.append(f"{type(model).__qualname__} {type(model.get_base_model()).__qualname__}")
    print(json.dumps(names))
""")
PICKLED = {
    "slices": LoRAConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"], fused_slices={"c_attn": ["q", "v"]}),
    "dora-maps": DoRAConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn", "c_proj"], rank_map={"h.1.*": 4}),
}


def test_models_pickle_into_a_fresh_process(tmp_path, input_ids):
    """Each model (fused slices; DoRA with a rank map) pickled here and loaded, with equal logits, in one new process
    that has not imported hf_lorax (the first load rebuilds hf_lorax's model classes from their names; was one
    process per model, parametrized ``slices`` and ``dora-maps``)."""
    paths = []
    for name, config in PICKLED.items():
        torch.manual_seed(0)
        model = get_model(config, model=GPT2LMHeadModel(gpt2_config()))
        randomize_adapters(model)
        model.eval()
        with torch.no_grad():
            expected = model(input_ids).logits
        torch.save(model, tmp_path / f"{name}.pt")
        torch.save((input_ids, expected), tmp_path / f"{name}-io.pt")
        paths += [str(tmp_path / f"{name}.pt"), str(tmp_path / f"{name}-io.pt")]
    names = json.loads(_run(LOAD_PICKLED, *paths))
    assert names == ["HfLoraxPeftModelForCausalLM LogitsFreeGPT2LMHeadModel"] * len(PICKLED)
