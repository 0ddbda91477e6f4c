"""Model card templates (installed as ``hf_lorax.model_cards``), rendered by :mod:`hf_lorax.card`."""
