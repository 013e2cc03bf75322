"""A GPT built from scratch in PyTorch, trained through a cached DVC pipeline."""

__version__ = "0.1.0"
