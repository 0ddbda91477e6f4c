"""DeepSpeed ZeRO-3 with the adapter partitioned too, on 2 CPU processes over gloo: one Trainer step, then the
ways a user saves.

    torchrun --nproc_per_node 2 zero3_save_job.py OUT

OUT/trainer: ``Trainer.save_model``; OUT/every: ``model.save_pretrained`` on every process; then the pattern
peft's and transformers' docs show, ``if trainer.is_world_process_zero(): model.save_pretrained(OUT/rank0)``,
whose error (if any) rank 0 reports on stderr with the seconds it took; once both processes meet again,
OUT/again: ``model.save_pretrained`` on every process.
"""

import os
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402

deepspeed.init_distributed(dist_backend="gloo")  # before TrainingArguments, as the task scripts do

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from conftest import roberta_config  # noqa: E402
from transformers import RobertaForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from hf_lorax import LoRAConfig, get_model  # noqa: E402

OUT = sys.argv[1]
rank = dist.get_rank()
ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
         "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}  # the adapter sharded too
args = TrainingArguments(output_dir=os.path.join(OUT, "run"), max_steps=1, per_device_train_batch_size=2,
                         save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, deepspeed=ZERO3)
torch.manual_seed(0)
model = get_model(LoRAConfig(task_type="SEQ_CLS", num_labels=2, r=4, target_modules=["query", "value"],
                             rank_map={"layer.1.*": 2}),
                  model=RobertaForSequenceClassification(roberta_config(hidden_dropout_prob=0.0)))
ids = torch.randint(3, 96, (4, 8), generator=torch.Generator().manual_seed(0))
rows = [{"input_ids": row, "labels": int(row[0] > 48)} for row in ids.tolist()]
trainer = Trainer(model=model, args=args, train_dataset=rows)
trainer.train()

trainer.save_model(os.path.join(OUT, "trainer"))
model.save_pretrained(os.path.join(OUT, "every"), is_main_process=rank == 0)
start = time.monotonic()
try:
    if trainer.is_world_process_zero():
        model.save_pretrained(os.path.join(OUT, "rank0"))
except RuntimeError as error:
    print(f"rank {rank} raised after {time.monotonic() - start:.1f} s: {error}", file=sys.stderr, flush=True)
dist.barrier()
model.save_pretrained(os.path.join(OUT, "again"), is_main_process=rank == 0)  # the error left nothing pending
print(f"rank {rank} done", file=sys.stderr, flush=True)
dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # gloo's threads can abort the interpreter's teardown after the work is saved
