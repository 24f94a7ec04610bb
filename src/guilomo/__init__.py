"""guilomo: LoRA mixtures of experts with searched expert counts and ranks."""

__version__ = "0.1.0"
