"""A toy task importable by path (`--task=toy_task:ParityTask`), for train.py runs in subprocesses.

Reward: the retry's text has even length, so a tiny random model gets about half its groups with reward
variance and something to learn. tests/test_torchrun.py runs train.py under torchrun with this task;
it needs tests/ on PYTHONPATH.

`SkewedTask` decides right or wrong by the example alone, laid out so that under 2 ranks one rank's
examples all succeed and the other's all fail (tests/test_torchrun.py: no rank may hang on the others).

It does not: load data, score anything meaningful, or stand in for the real tasks in r3/tasks.
"""
import os
import time


class ParityTask:
    """Any text whose length is even is 'correct' (random models get ~50%)."""
    name = "parity"  # must equal the `task` field of the failure rows train.py is given
    reflection_prompt = "You failed. Reflect."

    def examples(self, split):
        return [{"q": f"Say something, {i}."} for i in range(6)]

    def prompt(self, ex):
        return [{"role": "user", "content": ex["q"]}]

    def verify(self, ex, text):
        return len(text) % 2 == 0


class SkewedTask:
    """Example i of either split is right (whatever the text) iff i < 4: the failure build and the evaluation
    give rank r of 2 the contiguous half r, so rank 0 solves all its queries, rank 1 none. With TOY_HANG_RANK=r in the
    environment, rank r hangs in an evaluation (a rank that never comes): at its verify of a held-out
    example after the first TOY_HANG_AFTER (default 0)."""
    name = "skewed"
    reflection_prompt = "You failed. Reflect."

    def examples(self, split):
        return [{"q": f"Say something, {i}.", "ok": i < 4, "split": split} for i in range(8)]

    def prompt(self, ex):
        return [{"role": "user", "content": ex["q"]}]

    held_out_verdicts = 0

    def verify(self, ex, text):
        if ex["split"] == "test" and os.environ.get("RANK") == os.environ.get("TOY_HANG_RANK", "none"):
            SkewedTask.held_out_verdicts += 1
            if SkewedTask.held_out_verdicts > int(os.environ.get("TOY_HANG_AFTER", "0")):
                time.sleep(3600)
        return ex["ok"]
