"""Test-wide setup: environment before any heavy import, tiny random models, the real default model.

TRITON_INTERPRET must be set before triton is first imported (so the Triton kernel runs on CPU under
the interpreter), and HF_HUB_OFFLINE before transformers is (no hub is reachable here).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
