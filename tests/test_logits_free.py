"""Logits-free causal-LM training (:mod:`hf_lorax.loss`): what ``get_model`` gives a plain ``Trainer``.

These architectures are built tiny from their config and trained one step both ways (the model's own
forward with transformers' loss, and the logits-free forward); loss and every gradient must agree.
"""

import copy

import pytest
import torch
import transformers as tf
from conftest import gpt2_config, randomize_adapters

from hf_lorax import LoRAConfig, get_model
from hf_lorax.loss import (
    LogitsFreeCausalLM,
    logits_free_unsupported_reason,
)

SMALL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)
ARCHITECTURES = {
    "gpt2": lambda: tf.GPT2LMHeadModel(gpt2_config()),
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **SMALL)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, **SMALL)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **SMALL)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(num_key_value_heads=2, head_dim=8, **SMALL)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, **SMALL)),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                                                  max_position_embeddings=64)),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**SMALL)),
}


def test_every_architecture_here_is_supported_by_inspection():
    # decided from the model itself (tests/test_heads.py and the zoo matrix cover the other architectures)
    for name, build in ARCHITECTURES.items():
        assert logits_free_unsupported_reason(build()) is None, name


def _pair(base, **config_kwargs):
    config = LoRAConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear", **config_kwargs)
    free = get_model(config, model=copy.deepcopy(base))
    stock = get_model(copy.deepcopy(config), model=copy.deepcopy(base), logits_free_loss=False)
    for m in (free, stock):
        randomize_adapters(m, seed=1)
        m.train()
    return free, stock


def _step(model, batch):
    torch.manual_seed(5)  # the same dropout masks in both models
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out, grads


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_logits_free_loss_and_gradients_equal_the_models_own(arch):
    torch.manual_seed(0)
    free, stock = _pair(ARCHITECTURES[arch]())
    assert isinstance(free.get_base_model(), LogitsFreeCausalLM)
    assert not isinstance(stock.get_base_model(), LogitsFreeCausalLM)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt without labels, and padding at the end
    labels[1, -3:] = -100
    for extra in ({}, {"num_items_in_batch": torch.tensor(40)}):
        batch = {"input_ids": ids, "labels": labels, **extra}
        out_free, grads_free = _step(free, batch)
        out_stock, grads_stock = _step(stock, batch)
        assert out_free.logits is None and out_stock.logits.shape == (2, 12, 96)
        assert float(out_free.loss) == pytest.approx(float(out_stock.loss), rel=1e-5)
        assert grads_free.keys() == grads_stock.keys()
        for name in grads_free:
            torch.testing.assert_close(grads_free[name], grads_stock[name], rtol=1e-4, atol=1e-6, msg=name)
    free.eval()
    with torch.no_grad():  # evaluation keeps the model's own forward: logits and the same loss
        evaluated = free(input_ids=ids, labels=labels)
        reference = stock.eval()(input_ids=ids, labels=labels)
    assert evaluated.logits.shape == (2, 12, 96)
    assert float(evaluated.loss) == pytest.approx(float(reference.loss), rel=1e-6)
    free.train()  # a tuple output was asked for: the model's own forward, logits included
    as_tuple = free(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[1].shape == (2, 12, 96)


def test_trainer_trains_without_forming_logits(tmp_path):
    torch.manual_seed(0)
    free, stock = _pair(tf.GPT2LMHeadModel(gpt2_config()), lora_dropout=0.1)
    head_calls = []
    free.get_base_model().lm_head.register_forward_hook(lambda m, i, o: head_calls.append(o.shape))
    ids = torch.randint(3, 96, (8, 12), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in ids]
    losses = {}
    for name, model in (("free", free), ("stock", stock)):
        args = tf.TrainingArguments(str(tmp_path / name), max_steps=3, per_device_train_batch_size=4,
                                    gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1,
                                    report_to=[], seed=3, use_cpu=True, save_strategy="no")
        trainer = tf.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        losses[name] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert head_calls == []  # the LM head module never ran in training: no logits at all
    assert losses["free"] == pytest.approx(losses["stock"], rel=1e-4)


def test_training_step_compiles_whole_and_matches_eager():
    torch.manual_seed(0)
    free, _ = _pair(tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **SMALL)))
    eager = copy.deepcopy(free)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    torch._dynamo.reset()
    compiled = torch.compile(free, fullgraph=True, backend="aot_eager")
    for step in range(2):
        with torch._dynamo.config.patch(error_on_recompile=step >= 1):
            out = compiled(**batch)
        out.loss.backward()
    reference = eager(**batch)
    reference.loss.backward()
    assert out.logits is None
    assert float(out.loss) == pytest.approx(float(reference.loss), rel=1e-5)
    for (name, p), q in zip(free.named_parameters(), eager.parameters()):
        if p.requires_grad:  # compiled ran two backward passes, eager one
            torch.testing.assert_close(p.grad, 2 * q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_unsupported_models_keep_their_forward():
    torch.manual_seed(0)
    gemma2 = tf.Gemma2ForCausalLM(tf.Gemma2Config(num_key_value_heads=2, head_dim=8, **SMALL))
    assert "final_logit_softcapping" in logits_free_unsupported_reason(gemma2)
    model = get_model(LoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]), model=gemma2)
    assert not isinstance(model.get_base_model(), LogitsFreeCausalLM)
    model.train()
    assert model(input_ids=torch.tensor([[3, 4, 5]]), labels=torch.tensor([[3, 4, 5]])).logits is not None
    # a subclass with its own forward (here: an extra loss term) is not transformers' model: left alone
    class WithAuxLoss(tf.GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out["loss"] = out["loss"] + 1.0
            return out

    custom = WithAuxLoss(gpt2_config())
    assert "not transformers' own class" in logits_free_unsupported_reason(custom)
    model = get_model(LoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"]), model=custom).train()
    assert model(input_ids=torch.tensor([[3, 4, 5]]), labels=torch.tensor([[3, 4, 5]])).logits is not None
    # an adapted (or modules_to_save) LM head takes the model's own forward, with logits
    for targets in (["c_attn", "lm_head"], ["c_attn"]):
        adapted = get_model(LoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=targets,
                                       modules_to_save=None if "lm_head" in targets else ["lm_head"]),
                            model=tf.GPT2LMHeadModel(gpt2_config(tie_word_embeddings=False))).train()
        assert adapted(input_ids=torch.tensor([[3, 4, 5]]), labels=torch.tensor([[3, 4, 5]])).logits is not None
    # and it can be switched off
    model = get_model(LoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"]),
                      model=tf.GPT2LMHeadModel(gpt2_config()), logits_free_loss=False)
    assert type(model.get_base_model()) is tf.GPT2LMHeadModel


def test_bf16_autocast_runs_the_head_in_bf16_like_the_stock_head():
    torch.manual_seed(0)
    free, stock = _pair(tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **SMALL)))
    ids = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_free, grads_free = _step(free, {"input_ids": ids, "labels": ids})
        out_stock, grads_stock = _step(stock, {"input_ids": ids, "labels": ids})
    assert float(out_free.loss) == pytest.approx(float(out_stock.loss), rel=1e-2)
    for name in grads_free:
        torch.testing.assert_close(grads_free[name], grads_stock[name], rtol=5e-2, atol=5e-3, msg=name)


def test_logits_free_models_pickle_and_keep_the_trainers_causal_lm_label_smoothing(tmp_path):
    import pickle

    torch.manual_seed(0)
    free, stock = _pair(tf.GPT2LMHeadModel(gpt2_config()))
    again = pickle.loads(pickle.dumps(free.get_base_model()))
    assert isinstance(again, LogitsFreeCausalLM) and type(again).__name__ == "GPT2LMHeadModel"
    # the Trainer's label smoother shifts labels only for causal-LM class names: the name must stay the model's
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    args = tf.TrainingArguments(str(tmp_path), label_smoothing_factor=0.1, use_cpu=True, report_to=[])
    losses = [float(tf.Trainer(model=m.eval(), args=args).compute_loss(m, {"input_ids": ids, "labels": ids}))
              for m in (free, stock)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_label_smoothing_set_on_the_model_equals_the_trainers_and_forms_no_logits(tmp_path):
    """A Trainer with label_smoothing_factor pops the labels (full logits, and a warning once); with
    set_label_smoothing and label_smoothing_factor=0 the logits-free loss equals the Trainer's smoothed loss."""
    from hf_lorax.loss import set_label_smoothing

    torch.manual_seed(0)
    free, stock = _pair(tf.GPT2LMHeadModel(gpt2_config()))
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels}

    def loss(model, smoothing):
        args = tf.TrainingArguments(str(tmp_path), label_smoothing_factor=smoothing, use_cpu=True, report_to=[])
        torch.manual_seed(5)
        return tf.Trainer(model=model, args=args).compute_loss(model, dict(batch))

    expected = loss(stock, 0.1)
    with pytest.warns(UserWarning, match="set_label_smoothing"):
        loss(free, 0.1)
    set_label_smoothing(free, 0.1)
    heads = []
    handle = free.get_base_model().lm_head.register_forward_hook(lambda *a: heads.append(1))
    actual = loss(free, 0.0)
    handle.remove()
    assert heads == []  # the head's forward never ran: no logits
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="label_smoothing=2"):
        set_label_smoothing(free, 2)
    with pytest.raises(ValueError, match="does not compute a logits-free loss"):
        set_label_smoothing(stock, 0.1)


def test_training_forward_drops_the_key_value_cache_unless_asked():
    """A training step never reads a key/value cache, which would hold a copy of every layer's k and v through the
    loss; it is dropped (not switched off: use_cache=False makes transformers check for packed sequences, a sync)."""
    free, _ = _pair(tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **SMALL)))
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    assert free(input_ids=ids, labels=ids).past_key_values is None
    assert free(input_ids=ids, labels=ids, use_cache=True).past_key_values is not None
