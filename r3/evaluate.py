"""The paper's evaluation (docs/method.md section 7), one protocol for train.py's evaluation and `sample.py eval`.

`two_try_eval` runs r3.rollout.two_tries over examples in fixed chunks (a first try; on failure one
reflection and one retry), so the same model, examples and budgets give the same rows whichever script
asks; under torchrun each rank takes a contiguous slice of the examples and the counts are summed over ranks.
`wilson` is the 95% interval of a count.

It does not: print or write results (sample.py), or choose the examples (the callers take a split's first N).
"""
from __future__ import annotations

import math

import torch

EVAL_CHUNK = 16  # examples per two_tries call (a sampled evaluation's example i draws from seed's item i)


def two_try_eval(model, tok, task, examples: list[dict], *, max_attempt_tokens: int, max_reflection_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, rank: int = 0, world: int = 1,
                 progress: bool = False) -> tuple[list[dict], dict]:
    """This rank's rows {first, second, attempt[, reflection, retry]} and the counts over all ranks
    {n, first, second} (correct answers). temperature 0 is greedy (the paper's pass@1)."""
    from tqdm import tqdm

    from r3 import dist
    from r3.rollout import two_tries

    lo, hi = rank * len(examples) // world, (rank + 1) * len(examples) // world
    mine, rows = examples[lo:hi], []
    with dist.unsharded(model), torch.no_grad():
        for c in tqdm(range(0, len(mine), EVAL_CHUNK), desc="eval", unit="chunk", disable=not progress):
            rows += two_tries(model, tok, task, mine[c:c + EVAL_CHUNK], max_new_tokens=max_attempt_tokens,
                              max_reflection_tokens=max_reflection_tokens, temperature=temperature, top_p=top_p,
                              seed=seed, first=lo + c)
    counts = dist.all_reduce_sum(torch.tensor([len(rows), sum(r["first"] for r in rows),
                                               sum(r["second"] for r in rows)]), "the evaluation's counts")
    return rows, dict(zip(("n", "first", "second"), counts.tolist()))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)
    # exactly 0 and 1 at the ends (rounding leaves them a hair off, e.g. -3e-17, printed as "-0.0")
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)
