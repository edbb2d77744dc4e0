"""MoLF: gradient-guided optimizer routing between full fine-tuning and LoRA experts."""

__version__ = "0.1.0"
