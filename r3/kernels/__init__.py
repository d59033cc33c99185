"""Triton kernels with their torch references (logprobs.py: masked per-token log-probs)."""
