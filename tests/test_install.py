"""The installed environment and the repository's import names stay out of each other's way.

Proves: no top-level import name the repository provides (the `r3` package, the scripts at the root, the
modules that tests and bench scripts import by their bare names) equals one that an installed
distribution provides, so ours never shadows a dependency's (a top-level `kernels/` once shadowed Hugging
Face's `kernels`, which transformers >= 5.25 imports, and every transformers model import failed); and a
transformers model class imports with the repository root first on sys.path, the way every script,
pytest and `PYTHONPATH=.` run, while Hugging Face's `kernels` is installed.
"""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = "r3"  # our own distribution: it provides `r3`, which is no collision


def _module_names(folder: Path) -> set[str]:
    """Names importable when `folder` is on sys.path: its .py files and its folders that hold Python."""
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and any(p.rglob("*.py")) and not p.name.startswith(".")}
    return names


def project_import_names() -> set[str]:
    """The root (scripts, `PYTHONPATH=.`), tests/ (pytest puts it first) and bench/ (each bench script's folder)."""
    return _module_names(ROOT) | _module_names(ROOT / "tests") | _module_names(ROOT / "bench")


def test_project_names_include_what_scripts_import():
    names = project_import_names()
    assert {"r3", "train", "sample", "conftest", "toy_task", "tests", "bench"} <= names, sorted(names)


def test_no_project_import_name_is_provided_by_an_installed_distribution():
    provided = importlib.metadata.packages_distributions()  # top-level name -> distributions
    clashes = {name: provided[name] for name in project_import_names()
               if name in provided and set(provided[name]) - {OURS}}
    assert not clashes, f"our import names shadow installed distributions' (rename ours): {clashes}"


def test_transformers_model_imports_with_repo_root_first_and_hf_kernels_installed():
    hf_kernels = importlib.metadata.distribution("kernels")  # raises if absent: the lock installs it
    expected = Path(hf_kernels.locate_file("kernels/__init__.py")).resolve()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import kernels, transformers; "
            "from transformers import LlamaForCausalLM, Qwen2ForCausalLM; "
            "print(kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert Path(out.stdout.strip()).resolve() == expected, f"`kernels` is not Hugging Face's: {out.stdout}"
