"""Reload saved zoo cells with plain peft, in a process that never imports hf_lorax (tests/zoo.py runs it).

Argument: a manifest JSON (a list of cells: base model dir, adapter dir, inputs and expected outputs); writes
results.json beside it: per cell the largest output difference, or the error.
"""

import json
import os
import sys
from pathlib import Path

import torch
import transformers
from peft import PeftModel


def outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    parts = [out[k] for k in ("logits", "start_logits", "end_logits") if out.get(k) is not None]
    return torch.cat([p.double().reshape(-1) for p in parts])


def reload(entry: dict) -> dict:
    base = getattr(transformers, entry["class_name"]).from_pretrained(entry["base"], dtype=getattr(torch, entry["dtype"]))
    model = PeftModel.from_pretrained(base, entry["adapter"]).eval()
    io = torch.load(entry["io"])
    diff = (outputs(model, io["inputs"]) - io["expected"]).abs().max().item()
    return {"max_diff": diff}


def main(manifest: str) -> None:
    entries = json.loads(Path(manifest).read_text())
    results = {}
    for entry in entries:
        try:
            results[entry["id"]] = reload(entry)
        except Exception as exc:  # reported per cell; the test names it
            results[entry["id"]] = {"error": repr(exc)}
    results["_hf_lorax_imported"] = any(m == "hf_lorax" or m.startswith("hf_lorax.") for m in sys.modules)
    Path(manifest).with_name("results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # results.json is written; the interpreter's teardown of torch and transformers takes seconds
