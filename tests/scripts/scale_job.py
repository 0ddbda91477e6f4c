"""Train hf_lorax adapters a few steps under scale-out engines; save them every way a user would.

    python scale_job.py OUT ENGINE:METHOD[,METHOD...] [ENGINE:METHOD[,METHOD...] ...]   (single, loop: one process)
    torchrun --nproc_per_node 2 scale_job.py OUT ENGINE:METHOD[,...] [...]   (ddp and fsdp2, or zero2 and zero3)
    python scale_job.py OUT ENGINE METHOD [METHOD ...]   (one engine; OUT/METHOD instead of OUT/ENGINE/METHOD)

Several engines run one after the other in the same processes (one launch, one process group, one start-up of torch
and transformers), each writing OUT/ENGINE/METHOD. ZeRO stages are launched without the other engines.

METHOD: lora, dora or qlora, each on a tiny RoBERTa classifier (dropout off) with a rank map and an alpha map;
with fsdp2 and loop also gpt2: LoRA on a GPT-2 causal LM (passed in memory, ``model=``), whose training loss is
logits-free (the LM head's weight, tied and root-managed under FSDP2, is read without running the head).
The RoBERTa base is saved to OUT/base first and loaded by ``get_model`` after ``TrainingArguments`` exist, as the
task scripts do: under ZeRO-3 it loads already partitioned. single, ddp and the ZeRO stages train with the
``Trainer`` (ZeRO on DeepSpeed's CPU accelerator over gloo; ddp also writes a checkpoint at step 2); fsdp2 shards
each encoder layer (GPT-2 block) and the model with torch's ``fully_shard`` (accelerate applies FSDP to GPU backends
only) and trains with a plain loop, as loop does in one process. Per method, the folder gets ``trainer/``
(``Trainer.save_model``; not for fsdp2/loop), ``model/`` (``model.save_pretrained`` called on every process),
``rank_util/`` (the ``RankUtilizationCallback`` report, or for fsdp2/loop its analysis run the same way on every
process; each process is given its own folder, ``rank_util_from_rank1/`` on rank 1, so a write by another process
than rank 0 shows). fsdp2 also writes ``model_sd/``: torch's full state dict (``get_model_state_dict``) saved on rank
0 alone with ``save_pretrained(state_dict=...)``. zero3 with lora also tries the pattern peft's and transformers'
docs show, ``if trainer.is_world_process_zero(): model.save_pretrained(rank0/)``, with ``HF_LORAX_SAVE_TIMEOUT`` 5
s: rank 0 reports its error on stderr with the seconds it took; once both processes meet again, ``again/``:
``model.save_pretrained`` on every process (the error left no save pending).
"""

import json
import os
import sys
import time

OUT = sys.argv[1]
if ":" in sys.argv[2]:
    JOBS = [(spec.split(":")[0], spec.split(":")[1].split(","), os.path.join(OUT, spec.split(":")[0]))
            for spec in sys.argv[2:]]
else:
    JOBS = [(sys.argv[2], sys.argv[3:], OUT)]
ZERO_LAUNCH = any(engine.startswith("zero") for engine, _, _ in JOBS)
assert not ZERO_LAUNCH or all(engine.startswith("zero") for engine, _, _ in JOBS), "ZeRO stages are launched alone"
if ZERO_LAUNCH:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # before TrainingArguments: ZeRO-3 loads bases partitioned

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from conftest import gpt2_config, roberta_config  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import GPT2LMHeadModel, RobertaForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from hf_lorax import DoRAConfig, LoRAConfig, QLoRAConfig, RankUtilizationCallback, get_model  # noqa: E402
from hf_lorax.integrations.sharding import SAVE_TIMEOUT_ENV  # noqa: E402
from hf_lorax.loss import LogitsFreeCausalLM  # noqa: E402

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


def data(method: str = "") -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (STEPS * GLOBAL_BATCH, 10), generator=g)
    labels = ids if method == "gpt2" else (ids[:, 1] > 48).long()
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def rank_util_dir(out: str) -> str:
    return os.path.join(out, "rank_util" if rank == 0 else f"rank_util_from_rank{rank}")


def train_with_trainer(engine: str, method: str, out: str) -> None:
    checkpoints = dict(save_strategy="steps", save_steps=2) if engine == "ddp" else dict(save_strategy="no")
    args = TrainingArguments(
        output_dir=out, max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // world, learning_rate=5e-3,
        max_grad_norm=1.0, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True, dataloader_num_workers=0, deepspeed=DEEPSPEED.get(engine), **checkpoints,
    )
    torch.manual_seed(0)
    model = get_model(config(method))
    callback = RankUtilizationCallback(every_n_steps=1, output_dir=rank_util_dir(out), plot=False)
    trainer = Trainer(model=model, args=args, train_dataset=data(), callbacks=[callback])
    trainer.train()
    print(f"rank {rank} {engine}: engine {trainer.accelerator.distributed_type.value} "
          f"{type(trainer.model_wrapped).__name__} world {trainer.accelerator.num_processes}", file=sys.stderr,
          flush=True)
    if rank == 0:
        logged = [e for e in trainer.state.log_history if "rank_utilization/mean" in e]
        with open(os.path.join(out, "logged.json"), "w") as f:
            json.dump(logged, f)
    trainer.save_model(os.path.join(out, "trainer"))
    model.save_pretrained(os.path.join(out, "model"), is_main_process=rank == 0)
    if engine == "zero3" and method == "lora":
        rank_zero_only_save(trainer, model, out)


def rank_zero_only_save(trainer, model, out: str) -> None:
    os.environ[SAVE_TIMEOUT_ENV] = "5"  # read at each save; the 60 s default would only make the test slower
    start = time.monotonic()
    try:
        if trainer.is_world_process_zero():
            model.save_pretrained(os.path.join(out, "rank0"))
    except RuntimeError as error:
        print(f"rank {rank} raised after {time.monotonic() - start:.1f} s: {error}", file=sys.stderr, flush=True)
    del os.environ[SAVE_TIMEOUT_ENV]
    dist.barrier()
    model.save_pretrained(os.path.join(out, "again"), is_main_process=rank == 0)  # the error left nothing pending


def train_with_fully_shard(engine: str, method: str, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    if method == "gpt2":
        base = GPT2LMHeadModel(gpt2_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        model = get_model(LoRAConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn", "c_fc"]), model=base)
        assert isinstance(model.get_base_model(), LogitsFreeCausalLM)
        blocks = model.base_model.model.transformer.h
    else:
        model = get_model(config(method))
        blocks = model.base_model.model.roberta.encoder.layer
    if engine == "fsdp2":
        for layer in blocks:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    rows = data(method)
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        batch = rows[step * GLOBAL_BATCH + rank * share: step * GLOBAL_BATCH + (rank + 1) * share]
        loss = model(input_ids=torch.tensor(batch["input_ids"]), labels=torch.tensor(batch["labels"])).loss
        loss.backward()  # a mean over this process's rows; FSDP2 averages the gradients over processes
        optimizer.step()
        optimizer.zero_grad()
    callback = RankUtilizationCallback(output_dir=rank_util_dir(out), plot=False)

    class State:  # what the callback reads of a TrainerState
        global_step, is_world_process_zero = STEPS, rank == 0

    callback.on_train_end(None, State(), None, model=model)
    model.save_pretrained(os.path.join(out, "model"), is_main_process=rank == 0)
    if engine == "fsdp2":  # the other way to save: torch's full state dict, written by rank 0 alone
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            model.save_pretrained(os.path.join(out, "model_sd"), state_dict=state)
        dist.barrier()


for engine, methods, root in JOBS:
    for method in methods:
        train = train_with_fully_shard if engine in ("fsdp2", "loop") else train_with_trainer
        train(engine, method, os.path.join(root, method))
        print(f"rank {rank} {engine} {method} done", file=sys.stderr, flush=True)
if distributed:
    dist.barrier()
    dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # the work is saved: gloo's threads can abort the interpreter's teardown, which takes seconds anyway
