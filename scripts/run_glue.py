"""GLUE with the LoRA paper's presets.

    python scripts/run_glue.py --preset roberta-base/sst2 [--method lora|dora|qlora|qdora] [--rank_map FILE]
        [--data_dir ../shared/data/glue] [--max_train_samples N] [--init_adapter runs/mnli/adapter]
        [--push_to_hub --hub_model_id me/roberta-base-lora-sst2] [--output_dir runs/sst2]

Any preset field (r, lora_alpha, learning_rate, batch_size, epochs, max_length, ...) can be overridden.
Without --data_dir the task is loaded from the Hub (nyu-mll/glue).
"""

from __future__ import annotations

import sys

from transformers import HfArgumentParser

from hf_lorax_paper.tasks.glue import GlueArguments, results_table, run


def main(argv=None) -> dict:
    (args,) = HfArgumentParser(GlueArguments).parse_args_into_dataclasses(args=argv)
    results = run(args)
    if results is None:  # a non-main process of a distributed run: the main one reports
        return {}
    print("\n" + results_table([results]))
    print(f"\nadapter: {args.output_dir}/adapter   results: {args.output_dir}/results.json")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
