"""Plain-peft LoRA baseline through the same harness as ``run_e2e.py`` / ``run_glue.py``.

    python scripts/run_peft_baseline.py e2e  [every run_e2e.py flag]  --method lora
    python scripts/run_peft_baseline.py glue [every run_glue.py flag] --method lora

Everything but the adapter is the task script's own (preset, targets found in the model, data, Trainer,
decoding, metrics, results.json): only the model is built by peft's ``LoraConfig`` + ``get_peft_model`` with
the same r, lora_alpha, lora_dropout, target modules and modules_to_save as the hf_lorax run. For comparing
hf_lorax with plain peft (docs/real_weights.md). Plain peft cannot slice a fused projection, so models
whose query/value live in one (GPT-2's c_attn) are refused; so are --rank_map and methods other than lora.
"""

from __future__ import annotations

__hf_lorax_command__ = True  # an hf_lorax command: third-party import messages held back (hf_lorax.cli)

import sys

from hf_lorax_paper import experiment


def build_peft_model(plugin, preset, method, data, **adapter_overrides):
    import transformers
    from peft import LoraConfig, get_peft_model

    from hf_lorax.task_types import AUTO_CLASSES

    fields = plugin.adapter_fields(preset, method, data)
    if method.method != "lora" or adapter_overrides or fields.get("rank_map") or fields.get("fused_slices"):
        raise ValueError("run_peft_baseline.py: plain peft LoRA only (--method lora, no --rank_map, no fused slices).")
    labels = plugin.num_labels(preset)
    auto = getattr(transformers, AUTO_CLASSES[plugin.task_type()])
    model = auto.from_pretrained(preset.model_name_or_path, **({"num_labels": labels} if labels else {}))
    config = LoraConfig(task_type=fields["task_type"], r=fields["r"], lora_alpha=fields["lora_alpha"],
                        lora_dropout=fields["lora_dropout"], target_modules=fields["target_modules"],
                        modules_to_save=fields["modules_to_save"])
    return get_peft_model(model, config)


if __name__ == "__main__":
    tasks = {"e2e": ("hf_lorax_paper.tasks.e2e", "E2EPlugin"), "glue": ("hf_lorax_paper.tasks.glue", "GluePlugin")}
    if len(sys.argv) < 2 or sys.argv[1] not in tasks:
        print(f"usage: run_peft_baseline.py {{{','.join(tasks)}}} [the task script's flags]", file=sys.stderr)
        sys.exit(2)
    import importlib

    module, name = tasks[sys.argv[1]]
    plugin = getattr(importlib.import_module(module), name)()
    experiment.build_model = build_peft_model  # the one piece replaced: run() builds the model through it
    sys.exit(experiment.main(plugin, sys.argv[2:]))
