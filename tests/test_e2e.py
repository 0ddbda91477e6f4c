"""E2E NLG: MR format, CSV reading, targeted loss vs the Trainer's, presets against the paper, end-to-end runs."""

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapters
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from hf_lorax import LoRAConfig, TargetedLossTrainer, get_model
from hf_lorax.layers import trained_parameter_count
from hf_lorax_paper.experiment import parse
from hf_lorax_paper.experiment import run as run_experiment
from hf_lorax_paper.tasks.e2e import CausalLMCollator, E2EPlugin, generate, merged_adapter
from hf_lorax_paper.tasks.e2e_data import (
    detokenize,
    encode_example,
    format_mr,
    group_by_mr,
    limit_mrs,
    load_hub,
    parse_mr,
    read_csv,
    tokenize_text,
)
from hf_lorax_paper.tasks.e2e_presets import PAPER_RESULTS, PRESETS, E2EPreset

SHARED_E2E = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "e2e"

# The copy of the LoRA paper, Table 3 (E2E test set): a typo in a preset fails here.
TABLE3 = """
gpt2-medium LoRA 0.35   70.4 8.85 46.8 71.8 2.53
gpt2-medium FT   354.92 68.2 8.62 46.2 71.0 2.47
gpt2-large  LoRA 0.77   70.4 8.89 46.8 72.0 2.47
gpt2-large  FT   774.03 68.5 8.78 46.0 69.9 2.45
"""


def test_paper_results_table():
    for line in TABLE3.strip().splitlines():
        setting, method, *numbers = line.split()
        row = next(r for r in PAPER_RESULTS[setting] if r.method == method)
        assert (row.trainable_params_m, row.BLEU, row.NIST, row.METEOR, row.ROUGE_L, row.CIDEr) == tuple(map(float, numbers))
    assert PRESETS["gpt2-medium/e2e"].reference.metrics()["BLEU"] == pytest.approx(0.704)
    assert PRESETS["gpt2-large/e2e"].reference.metrics()["NIST"] == pytest.approx(8.89)


@pytest.mark.parametrize(("name", "layers", "hidden", "heads", "params"),
                         [("gpt2-medium/e2e", 24, 1024, 16, 393_216), ("gpt2-large/e2e", 36, 1280, 20, 737_280)])
def test_presets_match_table_11(name, layers, hidden, heads, params):
    p = PRESETS[name]
    assert p.model_name_or_path == name.split("/")[0]
    assert (p.r, p.lora_alpha, p.lora_dropout, p.batch_size, p.epochs, p.learning_rate, p.weight_decay) == (
        4, 32, 0.1, 8, 5, 2e-4, 0.01)
    assert (p.warmup_steps, p.label_smoothing, p.max_length) == (500, 0.1, 512)
    assert (p.num_beams, p.length_penalty, p.no_repeat_ngram_size, p.max_new_tokens) == (10, 0.9, 4, 64)
    assert p.target_modules == ("c_attn",) and p.slices == ("q", "v")
    with torch.device("meta"):  # the real shapes, no weights allocated
        base = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads))
    model = get_model(LoRAConfig(task_type="CAUSAL_LM", r=p.r, lora_alpha=p.lora_alpha,
                                 target_modules=list(p.target_modules), fused_slices={"c_attn": list(p.slices)}),
                      model=base)
    assert trained_parameter_count(model) == params  # B is held dense; only its q and v blocks train


# -- MR format (microsoft/LoRA examples/NLG/data/e2e) -------------------------------------------------------

MRS = {
    "name[The Vaults], eatType[pub], priceRange[more than £30], customer rating[5 out of 5], near[Café Adriatic]":
        "name : The Vaults | Type : pub | price : more than £ 30 | customer rating : 5 out of 5 | near : Café Adriatic",
    "name[The Cambridge Blue], eatType[pub], food[English], priceRange[cheap], near[Café Brazil]":
        "name : The Cambridge Blue | Type : pub | food : English | price : cheap | near : Café Brazil",
    "name[X], eatType[pub], priceRange[£20-25], familyFriendly[yes]":
        "name : X | Type : pub | price : £ 20 - 25 | family friendly : yes",
    "name[Blue Spice], eatType[coffee shop], area[city centre]": "name : Blue Spice | Type : coffee shop | area : city centre",
}
REFS = {
    "The Vaults pub near Café Adriatic has a 5 star rating. Prices start at £30.":
        "The Vaults pub near Café Adriatic has a 5 star rating . Prices start at £ 30 .",
    "Close to Café Brazil, The Cambridge Blue pub serves delicious Tuscan Beef for the cheap price of £10.50.":
        "Close to Café Brazil , The Cambridge Blue pub serves delicious Tuscan Beef for the cheap price of £ 10.50 .",
    "A family-friendly place (it's in the city centre) costing £20-25!":
        "A family-friendly place ( it's in the city centre ) costing £ 20 - 25 !",
}


def test_mr_format_matches_microsoft_lora():
    for mr, formatted in MRS.items():
        assert format_mr(mr) == formatted
    for ref, tokenized in REFS.items():
        assert tokenize_text(ref) == tokenized
        assert detokenize(tokenized) == ref
    assert parse_mr(" name[A] ,near[B] ") == [("name", "A"), ("near", "B")]


@pytest.mark.parametrize("mr", ["name[The Vaults", "name The Vaults", "name[A] eatType[pub]", "", "name[A], [pub]"])
def test_bad_mr_names_the_row(mr):
    with pytest.raises(ValueError, match=r"devset.csv row 7.*(does not parse|is empty)"):
        parse_mr(mr, "devset.csv row 7")


def test_encode_example_masks_the_mr():
    tokenizer = build_tokenizer()
    mr = "name[Blue Spice], eatType[coffee shop], area[city centre]"
    example = encode_example(tokenizer, mr, "Blue Spice is a coffee shop.", 512)
    context = tokenizer(MRS[mr], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    completion = tokenizer(" Blue Spice is a coffee shop .", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example["input_ids"] == context + completion
    assert example["labels"] == [-100] * len(context) + completion
    assert len(encode_example(tokenizer, mr, "Blue Spice is a coffee shop.", 8)["labels"]) == 8


def test_group_by_mr_keeps_first_appearance_order():
    mrs, groups = group_by_mr(["b", "a", "b", "c", "a"], ["1", "2", "3", "4", "5"])
    assert mrs == ["b", "a", "c"] and groups == [["1", "3"], ["2", "5"], ["4"]]


@pytest.mark.skipif(not (SHARED_E2E / "testset_w_refs.csv").exists(), reason="../shared/data/e2e not present")
def test_real_e2e_files():
    test = read_csv(str(SHARED_E2E / "testset_w_refs.csv"))
    mrs, groups = group_by_mr(test.mrs, test.refs)
    assert (len(test), len(mrs), sum(map(len, groups))) == (4693, 630, 4693)
    assert len(limit_mrs(test, 5).mrs) == sum(map(len, groups[:5]))
    assert all(format_mr(m) for m in mrs)
    assert len(group_by_mr(*(lambda s: (s.mrs, s.refs))(read_csv(str(SHARED_E2E / "devset.csv"))))[0]) == 547


# -- targeted loss == the Trainer's full-logits label-smoothed loss ----------------------------------------


def _lora_gpt2(vocab=96):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0))
    model = get_model(LoRAConfig(task_type="CAUSAL_LM", r=4, lora_alpha=32, lora_dropout=0.0, target_modules=["c_attn"],
                                 fused_slices={"c_attn": ["q", "v"]}), model=base)
    randomize_adapters(model)
    return model.eval()  # GPT-2's own dropout off, so two forwards are comparable


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 96, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # the MR prefix
    labels[0, :7] = -100
    mask = torch.ones_like(ids)
    mask[2, 9:], labels[2, 9:] = 0, -100  # right padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(trainer, model, batch, num_items=None):
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("num_items", [None, 50])
def test_targeted_loss_equals_trainer_label_smoothed_loss(tmp_path, num_items):
    model = _lora_gpt2()
    args = TrainingArguments(str(tmp_path), label_smoothing_factor=0.1, use_cpu=True, report_to=[])
    plain, targeted = Trainer(model=model, args=args), TargetedLossTrainer(model=model, args=args)
    assert plain.label_smoother is not None
    batch = _batch()
    ref_loss, ref_grads = _loss_and_grads(plain, model, batch, num_items)
    loss, grads = _loss_and_grads(targeted, model, batch, num_items)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert any(g.abs().max() > 0 for g in grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_training_loss_forms_no_logits_and_trains_a_tied_head_exactly(tmp_path):
    """Full fine-tuning of a plain transformers model: the tied LM head trains, and its gradient equals the
    Trainer's; the head module never runs (no logits)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=64,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=0, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0)).train()
    args = TrainingArguments(str(tmp_path), label_smoothing_factor=0.1, use_cpu=True, report_to=[])
    plain, targeted = Trainer(model=model, args=args), TargetedLossTrainer(model=model, args=args)
    batch = _batch()
    ref_loss, ref_grads = _loss_and_grads(plain, model, batch)
    rows = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: rows.append(out.shape[1]))
    loss, grads = _loss_and_grads(targeted, model, batch)
    handle.remove()
    assert rows == []  # the head module never ran: no logits
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads["transformer.wte.weight"].abs().max() > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_targeted_loss_evaluates_and_falls_back_as_the_trainer(tmp_path):
    """Evaluation (return_outputs, eval mode) and a model the logits-free loss does not support take the
    Trainer's own label-smoothed path: the same loss and logits as a plain Trainer."""

    class CustomLM(GPT2LMHeadModel):  # not transformers' own class: its forward may compute more than the loss
        pass

    args = TrainingArguments(str(tmp_path), label_smoothing_factor=0.1, use_cpu=True, report_to=[])
    batch = _batch()
    model = _lora_gpt2().eval()
    (loss, out), (ref_loss, ref_out) = (trainer.compute_loss(model, dict(batch), return_outputs=True)
                                        for trainer in (TargetedLossTrainer(model=model, args=args),
                                                        Trainer(model=model, args=args)))
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(out["logits"], ref_out["logits"])
    torch.manual_seed(0)
    custom = CustomLM(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=64, resid_pdrop=0.0,
                                 embd_pdrop=0.0, attn_pdrop=0.0)).train()
    targeted, plain = TargetedLossTrainer(model=custom, args=args), Trainer(model=custom, args=args)
    assert not targeted.logits_free
    torch.testing.assert_close(targeted.compute_loss(custom, dict(batch)), plain.compute_loss(custom, dict(batch)))


# -- decoding ---------------------------------------------------------------------------------------------


def test_merged_decoding_restores_weights_and_batching_is_exact():
    tokenizer = build_tokenizer()
    model = _lora_gpt2(vocab=len(tokenizer)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(1, len(tokenizer), (1, 6))
    unmerged = model(input_ids=x).logits
    with merged_adapter(model):
        torch.testing.assert_close(model(input_ids=x).logits, unmerged, atol=1e-5, rtol=1e-5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0, msg=k)
    preset = E2EPreset("tiny", "", num_beams=3, max_new_tokens=8)
    mrs = list(MRS)
    one_by_one = generate(model, tokenizer, mrs, preset, batch_size=1)
    assert generate(model, tokenizer, mrs, preset, batch_size=4) == one_by_one  # left padding changes nothing


# -- end to end on a tiny GPT-2 ----------------------------------------------------------------------------

NAMES = ["Blue Spice", "The Vaults", "Giraffe", "Aromi", "The Eagle", "Alimentum"]
TYPES = ["pub", "coffee shop", "restaurant"]
AREAS = ["riverside", "city centre"]


def _rows():
    rows = []
    for i, name in enumerate(NAMES):
        kind, area = TYPES[i % 3], AREAS[i % 2]
        mr = f"name[{name}], eatType[{kind}], area[{area}], priceRange[£20-25]"
        for ref in (f"{name} is a {kind} in the {area}.", f"In the {area}, {name} is a {kind} costing £20-25.",
                    f"There is a {kind} called {name} in the {area}, prices are £20-25."):
            rows.append((mr, ref))
    return rows


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme) trained on the test's own sentences; nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [format_mr(m) for m, _ in _rows()] + [" " + tokenize_text(r) for _, r in _rows()] + list(MRS.values())
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def write_csv(path: Path, rows, header="mr,ref") -> Path:
    def quote(s):
        return '"' + s.replace('"', '""') + '"'

    path.write_text(header + "\n" + "".join(f"{quote(m)},{quote(r)}\n" for m, r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny GPT-2 pre-trained (all weights, 80 steps) on the test's rows, so LoRA runs decode real sentences."""
    path = tmp_path_factory.mktemp("e2e_base")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tokenizer), n_positions=128,
                                       bos_token_id=eos, eos_token_id=eos))
    batch = CausalLMCollator(eos)([encode_example(tokenizer, m, r, 128) for m, r in _rows()])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds contention
    try:
        for _ in range(80):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def e2e_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("e2e_data") / "trainset.csv", _rows())


E2E = E2EPlugin()


def _args(tiny_base, e2e_csv, out, **kw):
    options = {"model_name_or_path": tiny_base, "train_file": str(e2e_csv), "test_file": str(e2e_csv),
               "output_dir": str(out), "use_cpu": True, "disable_tqdm": True, "report_to": "none", "max_steps": 6,
               "per_device_train_batch_size": 6, "learning_rate": 5e-3, "warmup_steps": 0, "num_beams": 3,
               "max_new_tokens": 20, "rank_utilization_steps": 2, "logging_steps": 2, **kw}
    argv = []
    for key, value in options.items():
        if value is not None:
            argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def run(argv):
    return run_experiment(E2E, parse(E2E, argv))


def resolve(argv):
    return parse(E2E, argv).preset


def test_zero_shot_row_decodes_the_base_model(tiny_base, e2e_csv, tmp_path):
    """``--max_steps 0``: nothing trains; the untrained adapter (B = 0) decodes exactly what the base model does."""
    run(_args(tiny_base, e2e_csv, tmp_path, max_steps=0, max_eval_samples=2, num_beams=1,
              meteor=False))  # METEOR starts a JVM: test_end_to_end[lora] runs it
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["train_loss"] is None and saved["test_mrs"] == 2 and "BLEU" in saved["metrics"]
    assert len((tmp_path / "predictions.txt").read_text(encoding="utf-8").splitlines()) == 2


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_end_to_end(method, tiny_base, e2e_csv, tmp_path):
    results = run(_args(tiny_base, e2e_csv, tmp_path, method=method, validation_file=str(e2e_csv), max_eval_samples=4,
                        meteor=method == "lora"))  # METEOR starts a JVM: once is enough
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["task_type"] == "text-generation" and saved["dataset"]["type"] == "e2e_nlg"
    assert saved["method"] == method and saved["test_mrs"] == 4 and saved["test_references"] == 12
    for name in ("BLEU", "NIST", "ROUGE_L", "CIDEr"):
        assert isinstance(saved["metrics"][name], float), (name, saved["metrics"])
    assert "METEOR" in saved["metrics"] or "METEOR" in saved["metrics_unavailable"]
    assert saved["reference"] is None  # a tiny GPT-2, not GPT-2 medium: Table 3 holds another model's numbers
    assert saved["paper_rows"][0]["model"] == "GPT-2 medium" and saved["paper_rows"][0]["BLEU"] == 70.4
    assert saved["eval_loss"] is not None and saved["trainable_params"] == results["trainable_params"] > 0
    predictions = (tmp_path / "predictions.txt").read_text(encoding="utf-8").splitlines()
    assert len(predictions) == 4
    groups = (tmp_path / "references.txt").read_text(encoding="utf-8").strip("\n").split("\n\n")
    assert [len(g.splitlines()) for g in groups] == [3, 3, 3, 3]
    assert groups[0].splitlines()[0] == "Blue Spice is a pub in the riverside."  # the original text
    table = (tmp_path / "results.md").read_text()
    assert f"| {Path(tiny_base).name} (ours) |" in table and "| paper, GPT-2 medium | LoRA | 0.35M | 70.4 | 8.85 |" in table
    adapter = tmp_path / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "hf_lorax.json", "README.md", "results.json",
                 "rank_utilization.png"):
        assert (adapter / name).exists(), name
    assert "BLEU" in (adapter / "README.md").read_text()
    assert sum(bool(p) for p in predictions) >= 3  # the pre-trained tiny base writes sentences
    reloaded = get_model(str(adapter), is_trainable=False)
    key = next(k for k in reloaded.state_dict() if "lora_B" in k)
    assert reloaded.state_dict()[key].abs().sum() > 0  # trained weights, not a fresh init
    mrs = group_by_mr(*zip(*_rows()))[0][:4]
    preset = resolve(_args(tiny_base, e2e_csv, tmp_path, method=method))
    assert generate(reloaded, AutoTokenizer.from_pretrained(tiny_base), mrs, preset, 4) == predictions


def test_push_to_hub_uploads_the_adapter(tiny_base, e2e_csv, tmp_path, recorded_hub):
    results = run(_args(tiny_base, e2e_csv, tmp_path, max_steps=1, max_eval_samples=1, rank_utilization=False,
                        meteor=False, push_to_hub=True, hub_model_id="me/x"))
    assert results["hub"].endswith("/commit/abc")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "results.json"} <= set(
        recorded_hub[0].uploaded())


# -- bad input: clear errors, nothing written --------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "change", "error", "match"),
    [
        ('meaning,text\n"name[A]","A."\n', {}, ValueError, r"has columns \['meaning', 'text'\].*missing \['mr', 'ref'\]"),
        ('mr,ref\n"name[A], eatType[pub","A is a pub."\n', {}, ValueError, r"bad.csv row 2: meaning representation"),
        ("", {}, ValueError, r"bad.csv is empty"),
        ("mr,ref\n", {}, ValueError, r"bad.csv holds no examples"),
        ('mr,ref\n"name[A]",""\n', {}, ValueError, r"bad.csv row 2: the reference for MR 'name\[A\]' is empty"),
        (None, {"preset": "gpt2-xl/e2e"}, ValueError, "Unknown E2E preset 'gpt2-xl/e2e'"),
        (None, {"method": "ia3"}, ValueError, "--method 'ia3'"),
        (None, {"push_to_hub": True}, ValueError, "--push_to_hub needs --hub_model_id"),
        (None, {"num_beams": 0}, ValueError, r"--num_beams 0: must be a whole number >= 1"),
        (None, {"test_file": None}, FileNotFoundError, "E2E needs a test set"),
        (None, {"data_dir": "nowhere"}, FileNotFoundError, "--data_dir 'nowhere' does not exist"),
    ],
)
def test_bad_input(content, change, error, match, tiny_base, e2e_csv, tmp_path):
    options = dict(change)
    if content is not None:
        (tmp_path / "bad.csv").write_text(content, encoding="utf-8")
        options["test_file"] = str(tmp_path / "bad.csv")
    with pytest.raises(error, match=match):
        run(_args(tiny_base, e2e_csv, tmp_path / "out", **options))
    assert not (tmp_path / "out").exists()


def test_hub_loading_boundary(monkeypatch):
    import datasets

    rows = _rows()
    data = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"meaning_representation": [m for m, _ in rows], "target": [r for _, r in rows]})
        for split in ("train", "validation", "test")})
    monkeypatch.setattr(datasets, "load_dataset", lambda name: data)
    splits = load_hub("GEM/e2e_nlg", max_train=5, max_eval_mrs=2)
    assert len(splits["train"]) == 5 and len(group_by_mr(splits["test"].mrs, splits["test"].refs)[0]) == 2
    gem_test = datasets.Dataset.from_dict({"meaning_representation": ["name[A]", "name[A]", "name[B]"],
                                           "target": ["A.", "A is.", "B."],
                                           "references": [["A.", "A is."], ["A.", "A is."], ["B."]]})
    monkeypatch.setattr(datasets, "load_dataset", lambda name: datasets.DatasetDict(train=data["train"], test=gem_test))
    test = load_hub("GEM/e2e_nlg")["test"]
    assert group_by_mr(test.mrs, test.refs) == (["name[A]", "name[B]"], [["A.", "A is."], ["B."]])

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(OSError, match="Pass --data_dir with the original E2E CSVs"):
        load_hub("e2e_nlg")


def test_collator_pads_right():
    batch = CausalLMCollator(pad_id=7)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_cli_overrides_reach_the_preset():
    experiment = parse(E2E, ["--preset", "gpt2-large/e2e", "--length_penalty", "0.8", "--num_beams", "4", "--r", "8",
                             "--no_meteor"])
    preset, args = experiment.preset, experiment.training
    assert (preset.model_name_or_path, preset.length_penalty, preset.num_beams, preset.r) == ("gpt2-large", 0.8, 4, 8)
    assert (args.learning_rate, preset.max_new_tokens, experiment.data.meteor) == (2e-4, 64, False)
    assert (args.label_smoothing_factor, args.max_grad_norm, args.warmup_steps, args.seed) == (0.1, 0.0, 500, 110)


def test_auto_rank_map_end_to_end(tiny_base, e2e_csv, tmp_path):
    """``--rank_map auto`` on E2E (GPT-2: fused ``c_attn`` slices): a probe, the budgeted map, the real run; the saved
    adapter holds exactly the allocated ranks and parameters, and results.json records the allocation."""
    from safetensors.torch import load_file

    from hf_lorax.layers import trained_parameter_count

    results = run(_args(tiny_base, e2e_csv, tmp_path, rank_map="auto", rank_budget_ratio=0.5, probe_steps=2,
                        probe_r=8, max_eval_samples=2, meteor=False))
    allocation = json.loads((tmp_path / "results.json").read_text())["rank_allocation"]
    assert allocation == results["rank_allocation"] and allocation["probe_steps"] == 2
    assert allocation["params"] <= allocation["budget"] and len(set(allocation["rank_map"].values())) >= 1
    reloaded = get_model(str(tmp_path / "adapter"), is_trainable=True)
    for name, rank in allocation["rank_map"].items():  # a fused c_attn holds its slices' ranks side by side
        layer = reloaded.get_submodule("base_model.model." + name)
        spec = getattr(layer, "slice_specs", {}).get("default")
        slices = len(spec.rows(layer.out_features, name)) if spec is not None else 1
        assert layer.r["default"] == rank * slices, (name, layer.r["default"], rank, slices)
    assert trained_parameter_count(reloaded) - _head_params(reloaded) == allocation["params"]
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("lora_" in k for k in weights)


def _head_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
