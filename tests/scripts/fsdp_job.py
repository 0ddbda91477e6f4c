"""FSDP2 (torch fully_shard) on CPU processes over gloo: train an hf_lorax adapter a few steps, save on rank 0.

    torchrun --nproc_per_node 2 fsdp_job.py OUT_DIR [roberta|gpt2]   (or plain `python fsdp_job.py ...`: one process)

roberta: DoRA on a classifier (the fused DoRA node on sharded layers); gpt2: LoRA on a causal LM, whose training
loss is logits-free (the LM head's weight, tied and root-managed, is read without running the head).
"""

import os
import sys

import torch
import torch.distributed as dist
from conftest import gpt2_config, roberta_config
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import GPT2LMHeadModel, RobertaForSequenceClassification

from hf_lorax import DoRAConfig, LoRAConfig, get_model
from hf_lorax.loss import LogitsFreeCausalLM

out = sys.argv[1]
distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
arch = sys.argv[2] if len(sys.argv) > 2 else "roberta"
torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
ids = torch.randint(3, 96, (4, 10), generator=g)
if arch == "gpt2":
    base = GPT2LMHeadModel(gpt2_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model = get_model(LoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn", "c_fc"]), model=base)
    assert isinstance(model.get_base_model(), LogitsFreeCausalLM)
    blocks, labels = model.base_model.model.transformer.h, ids
else:
    base = RobertaForSequenceClassification(roberta_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model = get_model(DoRAConfig(task_type="SEQ_CLS", num_labels=2, r=4, target_modules=["query", "value"]), model=base)
    blocks, labels = model.base_model.model.roberta.encoder.layer, torch.tensor([0, 1, 0, 1])
if distributed:
    for layer in blocks:
        fully_shard(layer)
    fully_shard(model)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
for _ in range(3):
    model(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
if distributed:
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        model.save_pretrained(out, state_dict=state)
    dist.barrier()
    dist.destroy_process_group()
    # The work is done and saved. gloo's worker threads can still abort the interpreter's C++ teardown
    # ("terminate called without an active exception", seen once in this test), so leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
else:
    model.save_pretrained(out)
