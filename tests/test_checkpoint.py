"""r3.checkpoint loads and saves Hugging Face directories that transformers agrees with.

Proves: single-file and sharded safetensors load to the same logits transformers computes; a model
saved by us loads back in transformers with the same logits (tiny models, and the real default model);
the real default model matches transformers within 1e-4 on real prompts; the default-model conversion
is atomic (an interrupted one is never taken as valid); bad directories and files end with a
`CheckpointError` that names the file.
"""
import json
import os
import shutil

import pytest
import torch
import transformers

import r3.checkpoint as ck
from conftest import tiny_hf_model
from r3.checkpoint import CheckpointError, load_hf, save_hf


@pytest.fixture()
def tiny_dir(tmp_path):
    hf = tiny_hf_model("qwen2", tied=False)
    hf.save_pretrained(tmp_path / "m")
    return tmp_path / "m", hf


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("sharded", [False, True])
def test_load_matches_transformers(tmp_path, sharded):
    hf = tiny_hf_model("llama", tied=True)
    hf.save_pretrained(tmp_path / "m", max_shard_size="100KB" if sharded else "10GB")
    assert (tmp_path / "m" / "model.safetensors.index.json").exists() == sharded
    ours = load_hf(tmp_path / "m")
    ids = torch.randint(0, 128, (2, 30))
    diff = (_logits(hf, ids) - _logits(ours, ids)).abs().max()
    assert diff <= 1e-5, f"max abs diff {diff:.3g}"
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # still tied after assign=True


def test_load_allocates_no_random_weights(tiny_dir, monkeypatch):
    """Built on the meta device: no parameter initialiser runs while loading."""
    on_real_memory = []
    real_reset = torch.nn.Linear.reset_parameters

    def reset(self):
        on_real_memory.extend(p for p in self.parameters(recurse=False) if not p.is_meta)
        real_reset(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", reset)
    model = load_hf(tiny_dir[0])
    assert on_real_memory == []
    assert not any(p.is_meta for p in model.parameters())


def test_save_then_transformers_loads_same_logits(tmp_path, tiny_dir):
    ours = load_hf(tiny_dir[0])
    out = save_hf(ours, tmp_path / "saved")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 25))
    diff = (_logits(back, ids) - _logits(ours, ids)).abs().max()
    assert diff == 0, f"max abs diff {diff:.3g}"


def test_missing_directory_names_it(tmp_path):
    with pytest.raises(CheckpointError, match=r"model directory .*nope does not exist"):
        load_hf(tmp_path / "nope")


def test_directory_without_config_names_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty/config\.json is missing"):
        load_hf(tmp_path / "empty")


def test_unsupported_architecture_names_supported_ones(tiny_dir):
    cfg_file = tiny_dir[0] / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported model.*LlamaForCausalLM"):
        load_hf(tiny_dir[0])


def test_truncated_safetensors_names_the_file(tiny_dir):
    f = tiny_dir[0] / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read weight file .*model\.safetensors"):
        load_hf(tiny_dir[0])


def test_missing_shard_names_the_file(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path / "m", max_shard_size="100KB")
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"weight file .*{shard.name} is missing"):
        load_hf(tmp_path / "m")


def test_interrupted_default_conversion_is_never_taken_as_valid(tmp_path, monkeypatch):
    monkeypatch.setenv("R3_CACHE", str(tmp_path))
    half = tmp_path / ck.DEFAULT_NAME
    half.mkdir()
    (half / "config.json").write_text("{}")  # what a crash mid-copy could leave, without .complete

    def crash(final):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "_convert_default", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.resolve_model("default")

    def convert(final):
        tmp = final.parent / "tmp-out"
        tmp.mkdir()
        (tmp / ".complete").write_text("ok")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    monkeypatch.setattr(ck, "_convert_default", convert)
    assert ck.resolve_model("default") == str(half)
    assert (half / ".complete").exists() and not (half / "config.json").exists()
    assert ck.resolve_model("/some/dir") == "/some/dir"


PROMPTS = [
    "What is the capital of France?",
    "Using the numbers [3, 7, 25], create an equation that equals 46. Return only the equation.",
    "Write a haiku about gradient descent.",
]


@pytest.mark.slow
def test_default_model_logits_match_transformers(default_dir, default_tok):
    ours = load_hf(default_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
    assert sum(p.numel() for p in ours.parameters()) == 134_515_008
    for p in PROMPTS:
        ids = torch.tensor([default_tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                            tokenize=True, return_dict=True)["input_ids"]])
        diff = (_logits(hf, ids) - _logits(ours, ids)).abs()
        assert diff.max() <= 1e-4, f"{p!r}: max abs diff {diff.max():.3g}, mean {diff.mean():.3g}"


@pytest.mark.slow
def test_default_model_save_then_transformers_loads_same_logits(default_dir, default_tok, tmp_path):
    ours = load_hf(default_dir)
    out = save_hf(ours, tmp_path / "export")
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([default_tok(PROMPTS[1])["input_ids"]])
    diff = (_logits(back, ids) - _logits(ours, ids)).abs().max()
    assert diff <= 1e-4, f"max abs diff {diff:.3g}"
