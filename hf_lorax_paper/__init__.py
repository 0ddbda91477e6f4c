"""The LoRA paper's reproduction harness, apart from the library.

GLUE on RoBERTa and E2E NLG on GPT-2 with the paper's presets (``tasks/``), on any encoder or causal LM with the
paper's targets found in it (``targets.py``), their metrics computed locally (``metrics/``), and ``make demo``
(``demo.py``). It uses only hf_lorax's public API; hf_lorax never imports it.
Scripts: ``scripts/run_glue.py``, ``scripts/run_e2e.py``.
"""
