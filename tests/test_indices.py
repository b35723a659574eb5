"""The fast index helpers agree with the obvious list comprehensions they replace."""

import random

import torch

from tp_loraprune.indices import index_tensor, kept_indices, membership, select_by_root


def test_index_tensor_equals_torch_tensor():
    values = random.Random(0).sample(range(50_000), 11_008)
    assert torch.equal(index_tensor(values), torch.tensor(values))
    assert index_tensor(()).dtype == torch.long and len(index_tensor([])) == 0


def test_kept_indices_is_the_complement_in_order():
    rng = random.Random(1)
    removed = set(rng.sample(range(1000), 300))
    assert kept_indices(1000, removed).tolist() == [i for i in range(1000) if i not in removed]
    assert kept_indices(5, []).tolist() == [0, 1, 2, 3, 4]


def test_select_by_root_keeps_pairs_whose_root_is_chosen():
    rng = random.Random(2)
    roots = [rng.randrange(200) for _ in range(2000)]
    indices = rng.sample(range(10_000), 2000)
    chosen = set(rng.sample(range(150), 40))  # some roots lie beyond the largest chosen one
    expected = [(i, r) for i, r in zip(indices, roots, strict=True) if r in chosen]
    got = select_by_root(indices, roots, membership(chosen))
    assert got == ([i for i, _ in expected], [r for _, r in expected])
    assert select_by_root(indices, roots, membership([])) == ([], [])
