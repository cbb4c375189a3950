"""metazo: zeroth-order fine-tuning of language models with learned perturbation policies."""

__version__ = "0.1.0"
