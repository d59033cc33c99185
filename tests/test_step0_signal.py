"""bench/step0_signal.py, the learnability check, on a tiny random model (its numbers mean nothing here).

Proves: for a task with hints and answers it reports both failure modes (greedy and sampled first tries)
with N failures each, the step-0 signal under sampled and greedy retries and the three written
reflections; its sampled-retry rewards are exactly what train.py's rollout (r3.rollout.rollout, same
seed and batch positions) gives on the same failures; rates are rates of what was counted; a task
without hint() or answer() gets "-" there, not an error.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from conftest import ParityTask

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import step0_signal  # noqa: E402


class IndexedParity(ParityTask):
    """ParityTask whose verdict also depends on the example's index (a tiny model's greedy text can be the same
    for every prompt), without hint() or answer()."""

    def examples(self, split):
        return [{"q": f"Say something, {i}.", "i": i} for i in range(24)]

    def verify(self, ex, text):
        return (len(text) + ex["i"]) % 2 == 0


class HintedParity(IndexedParity):
    """With a hint and an answer, so every column of the check has something to run."""

    def hint(self, ex):
        return "An answer of even length is right."

    def answer(self, ex):
        return "The right answer is: ok"


def test_check_reports_every_column_and_its_sampled_retry_is_train_pys_rollout(tiny_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "parities", type(sys)("parities"))
    sys.modules["parities"].HintedParity, sys.modules["parities"].IndexedParity = HintedParity, IndexedParity
    args = ["--model", str(tiny_dir), "--candidates", "parities:HintedParity;parities:IndexedParity",
            "--queries", "24", "--failures", "4", "--group_size", "2", "--chunk", "2", "--max_attempt_tokens", "4",
            "--max_reflection_tokens", "4", "--threads", "1", "--seed", "5"]
    threads = torch.get_num_threads()
    try:
        result = step0_signal.main(args)
    finally:
        torch.set_num_threads(threads)  # the script sets them for the whole process
    out = capsys.readouterr().out
    hinted, plain = result["results"]
    for mode in ("greedy_failures", "sampled_failures"):
        m = hinted[mode]
        assert m["failures"] == 4 and 0 <= m["first_try"] <= 1
        for retry in ("sampled_retry", "greedy_retry"):
            s = m[retry]
            assert 0 <= s["groups_with_variance"] <= s["fixed_by_any_of_G"] <= 1 and 0 <= s["retry_success"] <= 1
    w = hinted["written_reflection"]
    assert [w[k]["n"] for k in ("generic", "hint", "answer")] == [4, 4, 4]
    assert plain["written_reflection"]["hint"] == {"n": 0, "retry_success": None}
    assert "| parities:HintedParity | 4 greedy |" in out and json.loads(out.splitlines()[0])["task"]

    # the sampled retry is train.py's rollout: recompute the sampled failures' rewards through r3.rollout.rollout
    from r3.checkpoint import load_model
    from r3.rollout import rollout
    from r3.seeds import derive_seed

    _, model, tok = load_model(str(tiny_dir))
    a = argparse.Namespace(**result["args"])
    task = HintedParity()
    with torch.no_grad():
        fails, _ = step0_signal.find_failures(model, tok, task, task.examples("train")[:24], 4, 0.9, a, 8)
        rewards = torch.cat([rollout(model, tok, task, fails[c:c + 2], group_size=2, max_reflection_tokens=4,
                                     max_retry_tokens=4, temperature=0.9, retry_temperature=0.9,
                                     seed=derive_seed(5, "rollout", 1), first=c).rewards for c in range(0, 4, 2)])
    assert float(rewards.mean()) == hinted["sampled_failures"]["sampled_retry"]["retry_success"]
