"""E2E NLG with the LoRA paper's GPT-2 presets (Table 3).

    python scripts/run_e2e.py --preset gpt2-medium/e2e [--method lora|dora|qlora|qdora] [--rank_map FILE]
        [--data_dir ../shared/data/e2e | --train_file trainset.csv --validation_file devset.csv
         --test_file testset_w_refs.csv] [--length_penalty 0.8] [--num_beams 10]
        [--push_to_hub --hub_model_id me/gpt2-medium-lora-e2e] [--output_dir runs/e2e]

Any preset field (r, lora_alpha, learning_rate, batch_size, epochs, length_penalty, ...) can be overridden.
Without local files the data comes from the Hub (GEM/e2e_nlg). Writes adapter/, predictions.txt,
references.txt, results.json and results.md into --output_dir.
"""

from __future__ import annotations

import sys

from transformers import HfArgumentParser

from hf_lorax_paper.tasks.e2e import E2EArguments, results_table, run


def main(argv=None) -> dict:
    (args,) = HfArgumentParser(E2EArguments).parse_args_into_dataclasses(args=argv)
    results = run(args)
    if results is None:  # a non-main process of a distributed run: the main one reports
        return {}
    print("\n" + results_table([results]))
    unavailable = results.get("metrics_unavailable") or {}
    for name, reason in unavailable.items():
        print(f"{name} not computed: {reason}")
    print(f"\nadapter: {args.output_dir}/adapter   results: {args.output_dir}/results.json")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
