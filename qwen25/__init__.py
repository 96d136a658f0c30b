"""qwen25: the Qwen2.5 technical report, implemented end to end in readable PyTorch."""

__version__ = "0.1.0"
