"""Every random number r3 draws, as named streams of one seed.

A seed is an int; `derive_seed(seed, *keys)` names a stream inside it (a 63-bit hash, so different
keys give unrelated streams and no arithmetic of seeds can collide). The streams of a run, from its
--seed:

    derive_seed(seed, "failures", step)  the failure set: built at step 0 (also `sample.py failures`), rebuilt
                                         at `step` (--refresh_failures_every)
    derive_seed(seed, "rollout", step)   the reflections and retries of training step `step` (1, 2, ...)
    derive_seed(seed, "order", step, k)  the k-th permutation of the failure set that step `step` starts
    derive_seed(seed, "eval")            `sample.py eval --greedy=false` (greedy evaluation draws nothing)

Inside a call (r3/rollout.py), item i (a failure or a query) of a batch whose first item has global index
`first` draws from `item_seeds(stream, first, n)[i]` = derive_seed(stream, first + i): keyed by its index
in the step's global batch, so N ranks each sampling a slice draw what one process draws for the whole
batch. From an item's seed: its samples j = 0.. (r3/sampler.py: derive_seed(item, j), one uniform per
token), the retry after its reflection j (derive_seed(item, "retry", j)), and in the evaluation its
reflection and retry (derive_seed(item, "reflection"), derive_seed(item, "retry")).

Because every sample is a pure function of (seed, names), a resumed run draws what an uninterrupted one
does without saving any RNG state. It does not: seed torch's or numpy's global generators (nothing in
r3 uses them for sampling).
"""
from __future__ import annotations

import hashlib


def derive_seed(seed: int, *keys) -> int:
    """The seed of stream `keys` inside `seed` (keys: ints or names)."""
    text = ",".join(map(str, (seed, *keys)))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def item_seeds(seed: int, first: int, count: int) -> list[int]:
    """The seeds of items first .. first + count - 1 of a batch seeded by `seed`."""
    return [derive_seed(seed, first + i) for i in range(count)]
