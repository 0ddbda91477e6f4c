"""A small, deterministic hf_lorax training job used by the reliability tests (subprocess / torchrun).

    python train_job.py --base DIR --out DIR [--resume CKPT] [--stall_at STEP --mark FILE] [--batch N]
"""

import argparse
import os
import sys
import time

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_lorax import DoRAConfig, RankUtilizationCallback, get_model

parser = argparse.ArgumentParser()
parser.add_argument("--base", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--resume")
parser.add_argument("--stall_at", type=int)
parser.add_argument("--mark")
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--max_grad_norm", type=float, default=1.0)
args = parser.parse_args()


class StallAfterSave(TrainerCallback):
    """Signals that checkpoint-N is on disk, then waits to be killed (SIGKILL)."""

    def on_save(self, training_args, state, control, **kwargs):
        if state.global_step == args.stall_at:
            open(args.mark, "w").close()
            time.sleep(600)


g = torch.Generator().manual_seed(0)
ids = torch.randint(3, 96, (64, 10), generator=g)
data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 1] > 48).long().tolist()})
torch.manual_seed(0)
model = get_model(DoRAConfig(base_model_name_or_path=args.base, task_type="SEQ_CLS", num_labels=2, r=4,
                             target_modules=["query", "value"]))
rank = int(os.environ.get("RANK", "0"))
callbacks = [RankUtilizationCallback(every_n_steps=4, output_dir=os.path.join(args.out, f"rank_util_from_rank{rank}"))]
if args.stall_at:
    callbacks.append(StallAfterSave())
training_args = TrainingArguments(
    output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=5e-3,
    save_strategy="steps", save_steps=4, logging_steps=100, report_to=[], use_cpu=True, seed=0, data_seed=0,
    disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=args.max_grad_norm,
)
trainer = Trainer(model=model, args=training_args, train_dataset=data, callbacks=callbacks)
trainer.train(resume_from_checkpoint=args.resume)
trainer.save_model(os.path.join(args.out, "final"))
if torch.distributed.is_available() and torch.distributed.is_initialized():
    # tear gloo down before exit: a process group left to interpreter shutdown can abort ("terminate called
    # without an active exception") after the work is done
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
print(f"rank {rank} done", file=sys.stderr)
