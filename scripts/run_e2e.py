"""E2E NLG with the LoRA paper's GPT-2 presets, the way transformers' example scripts are run.

    python scripts/run_e2e.py --preset gpt2-medium/e2e --data_dir e2e-dataset [--method lora|dora|full|bitfit]
        [--length_penalty 0.8] [--train_file F --validation_file F --test_file F]
        [--model_name_or_path ANY_CAUSAL_LM] [--target_modules q_proj v_proj] [--fused_slices JSON]
        [any TrainingArguments flag: --num_train_epochs 1 --max_steps 100 --bf16 true --report_to tensorboard ...]

The preset fills defaults (Table 11's learning rate, batch size, warmup, label smoothing, ...); every flag
you give wins. On any causal LM the adapter goes where the paper put it, on the attention's query and value
(found in the model: q_proj/v_proj, or the q and v slices of a fused c_attn / query_key_value / qkv_proj / Wqkv;
hf_lorax_paper/targets.py); --target_modules, --fused_slices and --modules_to_save override. Without local
files the data come from the Hub (GEM/e2e_nlg). Errors: one line on stderr, exit code 2 (--debug or
HF_LORAX_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

__hf_lorax_command__ = True  # an hf_lorax command: third-party import messages held back (hf_lorax.cli)

import sys

from hf_lorax_paper.experiment import main
from hf_lorax_paper.tasks.e2e import E2EPlugin

if __name__ == "__main__":
    sys.exit(main(E2EPlugin(), sys.argv[1:]))
