"""Every random stream of a run has its own derivation from --seed: no two ever draw the same numbers."""
import torch

import run
from inputs import stream_seed


def first_draws(seed: int, counters: range, n: int) -> dict:
    """The first numbers each stream draws, keyed by where they came from."""
    gen = lambda s: torch.Generator().manual_seed(s)
    draws = {}
    for c in counters:
        for j, s in enumerate(run.candidate_seeds(seed, c, n)):
            draws[("candidate", c, j)] = gen(s)
        draws[("dpo", c)] = run.dpo_generator(seed, c)
        draws[("refl", c)] = run.refl_generator(seed, c)
        for i in range(n):  # sample.py and the eval samples: prompt k = c, video i
            draws[("sample", c, i)] = gen(stream_seed("sample", seed, c, i))
    return {key: tuple(torch.randn(4, generator=g).tolist()) for key, g in draws.items()}


def test_no_two_streams_draw_the_same_noise():
    seen = {}
    for seed in (0, 1, 2):
        for key, values in first_draws(seed, range(300), 4).items():
            assert values not in seen, f"{(seed, *key)} draws what {seen[values]} drew"
            seen[values] = (seed, *key)


def test_a_resumed_run_draws_what_an_uninterrupted_one_would():
    assert run.candidate_seeds(3, 17, 4) == run.candidate_seeds(3, 17, 4)
    assert [run.prompt_at(list("abcdef"), 1, c) for c in range(12)] == \
           [run.prompt_at(list("abcdef"), 1, c) for c in range(12)]
    first_pass = [run.prompt_at(list("abcdef"), 1, c) for c in range(6)]
    assert sorted(first_pass) == list("abcdef")  # each pass visits every prompt once
