"""The fake-tensor activation tracker behind benchmarks/real_size_accounting.py counts what a forward keeps
alive: checked against forwards whose peak is known by construction (temporaries freed on time, views of one
storage counted once, weights and their views left out)."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from real_size_accounting import fake_forward_peak  # noqa: E402


class Chain(torch.nn.Module):
    """Three temporaries of 1, 2 and 4 MiB (bf16), each dropped before the next but one is made."""

    def forward(self, x):
        a = x.new_zeros(512 * 1024)  # 1 MiB
        b = a.new_zeros(1024 * 1024) + 1  # 2 MiB (+ a 2 MiB temporary for the zeros, freed at once)
        del a
        c = b.new_zeros(2048 * 1024)  # 4 MiB while b (2 MiB) is alive
        return c.sum() + b.sum()


def test_peak_of_known_allocations():
    _, _, peak = fake_forward_peak(Chain, lambda m: m(torch.zeros(1, dtype=torch.bfloat16)))
    mib = 2**20
    # b's zeros and b (4 MiB), then c next to b (6 MiB, plus c.sum's scalar): the peak is 6 MiB and a few bytes.
    assert 6 * mib <= peak < 6 * mib + 1024


def test_views_are_not_counted_again():
    def forward(m):
        x = torch.zeros(1024 * 1024, dtype=torch.bfloat16) + 1  # 2 MiB (+ 2 MiB zeros freed at once)
        views = [x[i:] for i in range(100)]
        return views

    _, _, peak = fake_forward_peak(lambda: torch.nn.Identity(), forward)
    assert peak < 5 * 2**20


def test_weights_and_their_views_are_not_activations():
    lin = lambda: torch.nn.Linear(1024, 1024, bias=False)  # noqa: E731  (2 MiB of bf16 weight)
    _, _, peak = fake_forward_peak(lin, lambda m: m(torch.zeros(4, 1024, dtype=torch.bfloat16)))
    assert peak < 64 * 1024  # input and output rows only, not the weight (viewed transposed by the matmul)
