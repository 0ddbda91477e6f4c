"""GLUE with the LoRA paper's presets, the way transformers' example scripts are run.

    python scripts/run_glue.py --preset roberta-base/sst2 [--method lora|dora|qlora|qdora|full|bitfit]
        [--data_dir ../shared/data/glue] [--rank_map FILE] [--init_adapter runs/mnli/adapter]
        [--model_name_or_path ANY_ENCODER] [--target_modules query value] [--modules_to_save classifier]
        [any TrainingArguments flag: --num_train_epochs 1 --per_device_train_batch_size 32 --bf16 true
         --torch_compile true --report_to tensorboard --resume_from_checkpoint DIR --push_to_hub true ...]

The preset fills defaults (the paper's learning rate, batch size, epochs, ...); every flag you give wins.
On any encoder the adapter goes where the paper put it, on the attention's query and value (found in the model:
query/value, q_lin/v_lin, query_proj/value_proj, ...; hf_lorax_paper/targets.py); --target_modules,
--fused_slices and --modules_to_save override.
Without --data_dir the task is loaded from the Hub (nyu-mll/glue). Errors: one line on stderr, exit code 2
(--debug or HF_LORAX_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

__hf_lorax_command__ = True  # an hf_lorax command: third-party import messages held back (hf_lorax.cli)

import sys

from hf_lorax_paper.experiment import main
from hf_lorax_paper.tasks.glue import GluePlugin

if __name__ == "__main__":
    sys.exit(main(GluePlugin(), sys.argv[1:]))
