"""qlora: QLoRA fine-tuning with an NF4 base through bitsandbytes and LoRA factors."""

__version__ = "0.1.0"
