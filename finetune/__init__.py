"""finetune: parameter-efficient fine-tuning of decoder language models."""

__version__ = "0.1.0"
