"""Imported first by ``hf_lorax/__init__.py``: in an hf_lorax command, torch / transformers / peft are imported
without their import-time messages (:func:`hf_lorax.cli.quiet_startup`); elsewhere it does nothing."""

from .cli import quiet_startup

quiet_startup()
