"""torchtitan_like: a PyTorch-native, composable trainer for Llama-style models."""

__version__ = "0.1.0"
