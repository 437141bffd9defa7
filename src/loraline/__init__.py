"""loraline: release LoRA adapters to vLLM serving containers, with every step traced."""

__version__ = "0.1.0"
