"""The fast index helpers agree with the obvious list comprehensions they replace."""

import random

import pytest
import torch
import torch_pruning as tp
from torch import nn

from tp_loraprune.indices import index_tensor, kept_indices, membership, original_ids, positions_of, select_by_root
from tp_loraprune.surgery import prune_items


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


def test_select_by_root_when_the_item_indexes_its_root():
    roots = list(range(0, 300, 3))
    chosen = {0, 3, 150, 297}
    assert select_by_root(roots, list(roots), membership(chosen)) == (sorted(chosen), sorted(chosen))


def test_positions_of_and_original_ids_invert_each_other():
    rng = random.Random(3)
    alive = sorted(rng.sample(range(20_000), 11_008))
    ids = rng.sample(alive, 4000)
    index = {orig: pos for pos, orig in enumerate(alive)}
    positions = positions_of(alive, ids, "ffn")
    assert positions == sorted(index[i] for i in ids)
    assert original_ids(alive, positions) == sorted(ids)
    gone = next(i for i in range(20_000) if i not in index)
    with pytest.raises(ValueError, match=f"ffn: ids \\[{gone}\\] were already removed"):
        positions_of(alive, [alive[0], gone], "ffn")


def test_prune_items_slices_linears_as_torch_pruning_does():
    """The Linear fast path of prune_items gives the weights, bias and gradients Torch-Pruning's own functions
    give, and reports each replaced parameter with its kept indices."""
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(3, 6)
    for net in nets:
        net(x).sum().backward()
    removed = [7, 2, 5]
    reported = []
    graph = tp.DependencyGraph().build_dependency(nets[0], example_inputs=torch.randn(1, 6))
    prune_items(graph, graph.get_pruning_group(nets[0][0], tp.prune_linear_out_channels, removed), reported.append)
    reference = tp.DependencyGraph().build_dependency(nets[1], example_inputs=torch.randn(1, 6))
    reference.get_pruning_group(nets[1][0], tp.prune_linear_out_channels, removed).prune()
    for ours, theirs in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(ours, theirs) and torch.equal(ours.grad, theirs.grad)
    assert (nets[0][0].out_features, nets[0][2].in_features) == (7, 7)
    keep = [i for i in range(10) if i not in removed]
    assert sorted((r.attr, r.direction, r.dim, r.keep.tolist() == keep) for r in reported) == [
        ("bias", "out", 0, True),
        ("weight", "in", 1, True),
        ("weight", "out", 0, True),
    ]
