"""FSDP2 (torch fully_shard) on CPU processes over gloo: train an hf_lorax DoRA adapter a few steps, save on rank 0.

    torchrun --nproc_per_node 2 fsdp_job.py OUT_DIR        (or plain `python fsdp_job.py OUT_DIR` for one process)
"""

import os
import sys

import torch
import torch.distributed as dist
from conftest import roberta_config
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import RobertaForSequenceClassification

from hf_lorax import DoRAConfig, get_model

out = sys.argv[1]
distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
torch.manual_seed(0)
base = RobertaForSequenceClassification(roberta_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
model = get_model(DoRAConfig(task_type="SEQ_CLS", num_labels=2, r=4, target_modules=["query", "value"]), model=base)
if distributed:
    for layer in model.base_model.model.roberta.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
g = torch.Generator().manual_seed(1)
ids, labels = torch.randint(3, 96, (4, 10), generator=g), torch.tensor([0, 1, 0, 1])
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
else:
    model.save_pretrained(out)
