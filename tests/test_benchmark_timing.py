"""The efficiency benchmark's timing protocol: models timed in turns, speedups from paired rounds, and the bare
CUDA-graph decode loop producing exactly greedy generate()'s tokens (run here eagerly on the CPU)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import baselines  # noqa: E402
import efficiency  # noqa: E402


def test_calls_are_timed_in_turns_after_their_warmups():
    order = []
    calls = {"dense": lambda: order.append("d"), "pruned": lambda: order.append("p")}
    times = baselines.times_in_turns(calls, 2, 3, "cpu")
    assert order == ["d", "d", "p", "p"] + ["d", "p"] * 3
    assert {name: len(t) for name, t in times.items()} == {"dense": 3, "pruned": 3}


def test_speedup_is_the_median_of_per_round_ratios():
    # Per-round ratios 2, 4 and 0.5: their median is 2, where the ratio of the two medians (4 / 1) would say 4.
    assert efficiency.paired_speedup([2.0, 4.0, 8.0], [1.0, 1.0, 16.0])["median"] == pytest.approx(2.0)
    same = efficiency.paired_speedup([2.0, 4.0, 8.0], [1.0, 2.0, 4.0])
    assert same == {"median": 2.0, "q1": 2.0, "q3": 2.0}
    with pytest.raises(ValueError):
        efficiency.paired_speedup([1.0, 2.0], [1.0])


@torch.no_grad()
def test_graph_decode_gives_greedy_generates_tokens():
    model = efficiency.build("tiny", "cpu", dtype=torch.float32).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    run = efficiency.graph_decode(model, prompt, 12)
    reference = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(run(), reference[:, 16:])
    assert torch.equal(run(), reference[:, 16:])  # the static cache is reset between calls
