"""A task of one's own, exactly as the README shows it: `--task=module:Class` builds it, and it goes through a
rollout and one GRPO update on a tiny model.

Proves: the README's `my_task.py` block (found by its first line, `# my_task.py`) imports from sys.path as
`my_task:Reverse`, takes --task_options as constructor arguments, satisfies the Task protocol (disjoint
train/test splits; verify accepts the reversed word and rejects others); its failures go through
`r3.rollout.rollout` (the reflection mask is non-empty and each reward is task.verify of its retry) and
`r3.grpo.update` (finite loss over exactly the masked tokens). Bad `module:Class` specs are one-line errors.
"""
import re
from pathlib import Path

import pytest
import torch

from r3.tasks import TaskDataError, get_task, task_from_flags

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def readme_task_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    mine = [b for b in blocks if b.startswith("# my_task.py")]
    assert len(mine) == 1, f"{README.name} must hold exactly one ```python block starting with '# my_task.py'"
    return mine[0]


@pytest.fixture()
def my_task(tmp_path, monkeypatch):
    (tmp_path / "my_task.py").write_text(readme_task_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    import sys

    sys.modules.pop("my_task", None)


def test_readme_task_is_about_twenty_lines():
    code = [ln for ln in readme_task_source().splitlines() if ln.strip()]
    assert len(code) <= 25, len(code)


def test_readme_task_builds_from_module_and_class(my_task):
    task = task_from_flags("my_task:Reverse", options="test_every=3")
    assert task.test_every == 3 and task.name == "reverse"
    train, test = task.examples("train"), task.examples("test")
    assert train and test and not {e["word"] for e in train} & {e["word"] for e in test}
    ex = train[0]
    assert task.prompt(ex)[-1]["role"] == "user" and ex["word"] in task.prompt(ex)[-1]["content"]
    assert task.verify(ex, " " + ex["word"][::-1].upper() + ".") and not task.verify(ex, ex["word"])


def test_readme_task_runs_a_rollout_and_one_update(my_task, tiny_dir):
    from transformers import AutoTokenizer

    from r3.checkpoint import load_hf
    from r3.grpo import group_advantages, update
    from r3.rollout import rollout

    task = get_task("my_task:Reverse")
    torch.manual_seed(0)
    policy, tok = load_hf(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    failures = [{"task": task.name, "example": ex, "attempt": "no idea"} for ex in task.examples("train")[:2]]
    G = 3
    with torch.no_grad():
        ro = rollout(policy, tok, task, failures, group_size=G, max_reflection_tokens=6, max_retry_tokens=4,
                     temperature=1.0, retry_temperature=1.0, seed=0)
    assert ro.ids.shape[0] == 2 * G and ro.mask.any(dim=1).all()
    retries = [t["retry"] for t in ro.texts]
    expected = [float(task.verify(failures[i // G]["example"], y)) for i, y in enumerate(retries)]
    assert ro.rewards.tolist() == expected
    adv = group_advantages(ro.rewards, G)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    out = update(policy, None, ro.batch(adv), opt,
                 micro_batch=4, ppo_epochs=1, temperature=1.0, beta=0.0, clip_eps=0.2, grad_clip=1.0)
    assert torch.isfinite(torch.tensor(out["loss"])) and out["tokens"] == float(ro.mask.sum())


def test_bad_module_class_specs_name_the_fix(my_task):
    with pytest.raises(TaskDataError, match=r"no module 'nope_task' on sys.path"):
        get_task("nope_task:X")
    with pytest.raises(TaskDataError, match=r"module 'my_task' has no 'Reversed'"):
        get_task("my_task:Reversed")
    with pytest.raises(TaskDataError, match=r"cannot build Reverse.*unexpected keyword argument 'level'"):
        get_task("my_task:Reverse", level=2)
    with pytest.raises(TaskDataError, match=r"lacks \['reflection_prompt', 'examples', 'prompt', 'verify'\]"):
        get_task("pathlib:PurePath")
