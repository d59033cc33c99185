"""A toy task importable by path (`--task=toy_task:ParityTask`), for train.py runs in subprocesses.

Reward: the retry's text has even length, so a tiny random model gets about half its groups with reward
variance and something to learn. tests/test_torchrun.py runs train.py under torchrun with this task;
it needs tests/ on PYTHONPATH.

It does not: load data, score anything meaningful, or stand in for the real tasks in r3/tasks.
"""


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
