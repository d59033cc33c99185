"""bench/gpu.py --smoke runs every part of the GPU benchmark on the CPU, so the script cannot rot.

Proves, by running the script as a subprocess from the repository root (PYTHONPATH=root, as on the GPU
machine) at tiny shapes:
- no part failed, and the training part ran unless r3.grpo.update does not exist (then it says so);
- the script's own correctness checks pass: the Triton kernel (through the interpreter) agrees with the
  naive log-probs in values and gradients, our logits equal transformers' in fp32 and greedy decoding equals
  HF generate, the compiled decode step gives the eager tokens, and the update runs under FSDP2;
- the JSON written to --out has every key the markdown table and bench/RESULTS.md need;
- it needs nothing that only our lock installs: it runs with the packages a GPU machine may lack (the
  default model's gguf and accelerate, TRL, the test tools, Hugging Face's `kernels`) made unimportable.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed here by the lock, but not on a GPU machine (torch, triton, transformers, numpy, safetensors,
# matplotlib preinstalled, no network): sys.modules[name] = None makes `import name` fail and
# importlib.util.find_spec(name) answer None, as if it were not installed.
NOT_ON_GPU_MACHINE = ("gguf", "accelerate", "trl", "pyarrow", "hypothesis", "pytest", "datasets", "kernels")


@pytest.mark.slow  # one inductor compile of the decode step: a minute or two on 2 CPU cores
def test_gpu_bench_smoke_runs_every_part_and_its_checks_pass(tmp_path):
    import r3.grpo

    out = tmp_path / "gpu.json"
    (tmp_path / "sitecustomize.py").write_text(f"import sys\nfor name in {NOT_ON_GPU_MACHINE!r}:\n"
                                               "    sys.modules[name] = None\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--json", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == res  # --json prints what --out holds
    parts = res["parts"]
    assert set(parts) == {"a_kernel", "b_model", "c_sampler", "d_train"}
    expect_train = "ok" if hasattr(r3.grpo, "update") else "skipped: r3.grpo.update not found"
    status = {k: p["status"] for k, p in parts.items()}
    assert status == {"a_kernel": "ok", "b_model": "ok", "c_sampler": "ok", "d_train": expect_train}, status
    checks = {f"{k}.{n}": ok for k, p in parts.items() for n, ok in p.get("checks", {}).items()}
    assert checks and all(checks.values()), {n: ok for n, ok in checks.items() if not ok}
    assert len([n for n in checks if n.startswith("a_kernel.")]) == 4  # fp32 / bf16 x 25% / 100% masked
    assert {"b_model.greedy32_fp32_equals_hf_generate",
            "c_sampler.qwen25_1.5b_compiled_greedy_equals_eager"} <= set(checks)
    assert "checks failed: none" in proc.stdout
    assert "sitecustomize" not in proc.stderr  # the blocker loaded without an error

    assert res["device"].startswith("cpu") and res["matmul_peak_tflops"] > 0
    for case in parts["a_kernel"]["cases"]:
        assert {"naive", "selective", "ours", "time_ratio_vs_naive", "memory_ratio_vs_naive", "agree"} <= set(case)
        assert case["ours"]["logp_max_abs_err"] >= 0 and case["selective"]["grad_weight_rel_err"] >= 0
    for shape in ("smollm2_135m", "qwen25_1.5b"):
        assert {f"{shape}_bfloat16_sdpa", f"{shape}_float32_sdpa"} <= set(parts["b_model"])
        r = parts["c_sampler"][shape]
        for key in ("batch1_eager_tok_s", "batch1_hf_tok_s", "rollout_eager_tok_s", "rollout_hf_tok_s",
                    "rollout_eager_vs_hf", "bandwidth_limit_tok_s", "batch1_eager_frac_of_limit"):
            assert r[key] > 0, (shape, key)
    qwen = parts["c_sampler"]["qwen25_1.5b"]
    assert qwen["batch1_compiled_tok_s"] > 0 and qwen["batch1_compile_s"] > 0
    if expect_train == "ok":
        d = parts["d_train"]
        assert d["tokens_per_s"] > 0 and 0 < d["mfu"] and d["flops_per_step"] > 0
