"""Train hf_lorax adapters a few Trainer steps under one scale-out engine; save them every way a user would.

    python scale_job.py OUT ENGINE METHOD [METHOD ...]            (ENGINE single or loop: one process)
    torchrun --nproc_per_node 2 scale_job.py OUT ENGINE METHOD [METHOD ...] (ENGINE ddp, zero2, zero3, fsdp2)

METHOD: lora, dora or qlora, each on a tiny RoBERTa classifier (dropout off) with a rank map and an alpha map.
The base is saved to OUT/base first and loaded by ``get_model`` after ``TrainingArguments`` exist, as the task
scripts do: under ZeRO-3 it loads already partitioned. single, ddp and the ZeRO stages train with the
``Trainer`` (ZeRO on DeepSpeed's CPU accelerator over gloo); fsdp2 shards each encoder layer and the model with
torch's ``fully_shard`` (accelerate applies FSDP to GPU backends only) and trains with a plain loop, as loop does
in one process. Per method, OUT/METHOD gets ``trainer/`` (``Trainer.save_model``;
not for fsdp2), ``model/`` (``model.save_pretrained`` called on every process) and ``rank_util/`` (the
``RankUtilizationCallback`` report, or for fsdp2 its analysis run the same way on every process).
"""

import json
import os
import sys

ENGINE = sys.argv[2]
if ENGINE.startswith("zero"):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # before TrainingArguments: ZeRO-3 loads bases partitioned

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from conftest import roberta_config  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import RobertaForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from hf_lorax import DoRAConfig, LoRAConfig, QLoRAConfig, RankUtilizationCallback, get_model  # noqa: E402

OUT, METHODS = sys.argv[1], sys.argv[3:]
STEPS, GLOBAL_BATCH = 3, 4
distributed = "RANK" in os.environ
if distributed and not dist.is_initialized():
    dist.init_process_group("gloo")
world = dist.get_world_size() if distributed else 1
rank = dist.get_rank() if distributed else 0
BASE = os.path.join(OUT, "base")
if rank == 0:
    torch.manual_seed(0)
    RobertaForSequenceClassification(roberta_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                                    classifier_dropout=0.0)).save_pretrained(BASE)
if distributed:
    dist.barrier()

ZERO = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_allow_untested_optimizer": True}
DEEPSPEED = {
    "zero2": {**ZERO, "zero_optimization": {"stage": 2}},
    "zero3": {**ZERO, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}},  # all sharded
}


def config(method: str):
    fields = dict(base_model_name_or_path=BASE, task_type="SEQ_CLS", num_labels=2, r=4, lora_alpha=8,
                  target_modules=["query", "value", "dense"], rank_map={"layer.1.*": 2},
                  alpha_map={"layer.0.attention.self.query": 16})
    if method == "qlora":
        return QLoRAConfig(compute_dtype="float32", quant_storage="float32", **fields)
    return (DoRAConfig if method == "dora" else LoRAConfig)(**fields)


def data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (STEPS * GLOBAL_BATCH, 10), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 1] > 48).long().tolist()})


def train_with_trainer(method: str, out: str) -> None:
    args = TrainingArguments(
        output_dir=out, max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // world, learning_rate=5e-3,
        max_grad_norm=1.0, save_strategy="no", logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True, dataloader_num_workers=0, deepspeed=DEEPSPEED.get(ENGINE),
    )
    torch.manual_seed(0)
    model = get_model(config(method))
    callback = RankUtilizationCallback(every_n_steps=1, output_dir=os.path.join(out, "rank_util"), plot=False)
    trainer = Trainer(model=model, args=args, train_dataset=data(), callbacks=[callback])
    trainer.train()
    print(f"rank {rank} engine {trainer.accelerator.distributed_type.value} {type(trainer.model_wrapped).__name__} "
          f"world {trainer.accelerator.num_processes}", file=sys.stderr, flush=True)
    if rank == 0:
        logged = [e for e in trainer.state.log_history if "rank_utilization/mean" in e]
        with open(os.path.join(out, "logged.json"), "w") as f:
            json.dump(logged, f)
    trainer.save_model(os.path.join(out, "trainer"))
    model.save_pretrained(os.path.join(out, "model"), is_main_process=rank == 0)


def train_with_fully_shard(method: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = get_model(config(method))
    if distributed:
        for layer in model.base_model.model.roberta.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    rows = data()
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        batch = rows[step * GLOBAL_BATCH + rank * share: step * GLOBAL_BATCH + (rank + 1) * share]
        loss = model(input_ids=torch.tensor(batch["input_ids"]), labels=torch.tensor(batch["labels"])).loss
        loss.backward()  # a mean over this process's rows; FSDP2 averages the gradients over processes
        optimizer.step()
        optimizer.zero_grad()
    callback = RankUtilizationCallback(output_dir=os.path.join(out, "rank_util"), plot=False)

    class State:  # what the callback reads of a TrainerState
        global_step, is_world_process_zero = STEPS, rank == 0

    callback.on_train_end(None, State(), None, model=model)
    model.save_pretrained(os.path.join(out, "model"), is_main_process=rank == 0)


for method in METHODS:
    folder = os.path.join(OUT, method)
    (train_with_fully_shard if ENGINE in ("fsdp2", "loop") else train_with_trainer)(method, folder)
    print(f"rank {rank} {ENGINE} {method} done", file=sys.stderr, flush=True)
if distributed:
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort the interpreter's teardown after the work is saved
