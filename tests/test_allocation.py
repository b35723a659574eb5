"""allocation="auto": the pure allocator against explicit references, and the pruner that uses it (exact, on
target, guards refused before any weight changes, uniform layouts, the scores deciding heads versus channels)."""

from __future__ import annotations

import copy
import itertools
import re
from functools import partial

import pytest
import torch
from conftest import batch, build_llama, logits, peft_layers, train_step, wrap_peft

from tp_loraprune import LoRAPruneConfig, LoRAPruner
from tp_loraprune.allocation import (
    allocate,
    channel_units,
    kv_group_units,
    merge_uniform,
    per_group_head_units,
    removable,
)
from tp_loraprune.latency_table import LatencyTable
from tp_loraprune.models import count_parameters

ALL3 = [0, 1, 2]


# ---------------------------------------------------------------------------------------------- pure allocator
def test_equal_costs_take_the_globally_lowest_scores():
    """Channels of one cost in several blocks: the allocation is the budget's worth of the lowest scores overall."""
    g = torch.Generator().manual_seed(0)
    scores = {f"ffn{i}": torch.rand(10, generator=g) for i in range(3)}
    blocks = [channel_units(k, i, s, cost=7, multiple=1, min_width=1) for i, (k, s) in enumerate(scores.items())]
    chosen = allocate(blocks, budget=7 * 12)
    ranked = sorted((float(v), k, p) for k, s in scores.items() for p, v in enumerate(s.tolist()))
    expected: dict[str, list[int]] = {}
    for _, k, p in ranked[:12]:
        expected.setdefault(k, []).append(p)
    assert chosen.removals == {k: sorted(v) for k, v in expected.items()}
    assert chosen.cost == 84
    assert chosen.score == pytest.approx(sum(v for v, *_ in ranked[:12]))


def test_units_are_ranked_by_score_per_parameter_across_kinds():
    """A head (score 10, 100 parameters: 0.1 per parameter) goes before a channel (score 1, 5 parameters: 0.2)."""
    heads = kv_group_units("attn", 0, torch.tensor([10.0, 50.0]), size=1, group_cost=100, min_kv=1)
    ffn = channel_units("ffn", 0, torch.tensor([1.0, 3.0, 4.0]), cost=5, multiple=1, min_width=1)
    assert allocate([ffn, heads], budget=100).removals == {"attn": [0]}
    assert allocate([ffn, heads], budget=105).removals == {"attn": [0], "ffn": [0]}
    cheap_head = kv_group_units("attn", 0, torch.tensor([30.0, 50.0]), size=1, group_cost=100, min_kv=1)
    assert allocate([ffn, cheap_head], budget=10).removals == {"ffn": [0, 1]}


def test_greedy_matches_brute_force_on_small_instances():
    """Against every combination of unit prefixes: at the cost the greedy reaches, nothing scores lower (exact
    here because every unit of a block costs the same and the costs divide each other)."""
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        blocks = [
            per_group_head_units("a", 0, torch.rand(2, 3, generator=g) * 8, q_cost=4, min_per_group=1),
            channel_units("f", 0, torch.rand(5, generator=g), cost=2, multiple=1, min_width=1),
            channel_units("h", 1, torch.rand(4, generator=g) * 2, cost=2, multiple=1, min_width=1),
        ]
        budget = int(torch.randint(2, 20, (1,), generator=g))
        chosen = allocate(blocks, budget)
        best = min(
            sum(u.score for b, n in zip(blocks, counts, strict=True) for u in b.units[:n])
            for counts in itertools.product(*(range(len(b.units) + 1) for b in blocks))
            if sum(u.cost for b, n in zip(blocks, counts, strict=True) for u in b.units[:n]) == chosen.cost
        )
        assert 0 <= budget - chosen.cost < 8  # short by less than the largest unit (a head unit: 2 groups x 4)
        assert chosen.score == pytest.approx(best)


def test_per_group_units_take_one_head_from_every_kv_group():
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.5, 9.0, 0.1]])  # 2 KV groups x 3 query heads
    block = per_group_head_units("attn", 4, scores, q_cost=10, min_per_group=1)
    assert [u.removals["attn"] for u in block.units] == [(1, 5), (2, 3)]
    assert [u.score for u in block.units] == [pytest.approx(1.1), pytest.approx(2.5)]
    assert all(u.cost == 20 and u.layer_costs == {4: 20} for u in block.units)
    assert per_group_head_units("attn", 4, scores, q_cost=10, min_per_group=2).units == block.units[:1]


def test_channel_units_keep_multiples_and_the_minimum_width():
    scores = torch.arange(10, 0, -1).float()  # channel 9 scores lowest
    block = channel_units("ffn", 0, scores, cost=3, multiple=4, min_width=1)
    assert [len(u.removals["ffn"]) for u in block.units] == [2, 4]  # 10 -> 8 -> 4, never below one multiple
    assert block.units[0].removals["ffn"] == (9, 8)  # in ranking order: `allocate` sorts what it takes
    assert channel_units("ffn", 0, scores, cost=3, multiple=4, min_width=5).units == block.units[:1]  # keeps 8


def test_budget_and_layer_room_are_never_exceeded():
    g = torch.Generator().manual_seed(1)
    blocks = [channel_units(f"f{i}", i, torch.rand(16, generator=g), cost=3, multiple=2, min_width=2) for i in range(3)]
    chosen = allocate(blocks, budget=50, layer_room={0: 6})
    assert chosen.cost <= 50 and 50 - chosen.cost < 6
    assert len(chosen.removals.get("f0", [])) <= 2
    assert removable(blocks) == 3 * 14 * 3
    assert removable(blocks, layer_room={0: 0, 1: 0}) == 14 * 3


def test_uniform_merge_removes_the_same_count_from_every_block():
    g = torch.Generator().manual_seed(2)
    blocks = [channel_units(f"f{i}", i, torch.rand(8, generator=g), cost=1, multiple=1, min_width=1) for i in range(3)]
    blocks += [per_group_head_units(f"a{i}", i, torch.rand(2, 2, generator=g), 5, 1) for i in range(3)]
    merged = merge_uniform(blocks)
    assert sorted(b.kind for b in merged) == ["channels", "heads"]
    for budget in (3, 9, 30, 33):
        chosen = allocate(merged, budget)
        counts = {len(chosen.removals.get(f"f{i}", [])) for i in range(3)}
        heads = {len(chosen.removals.get(f"a{i}", [])) for i in range(3)}
        assert len(counts) == 1 and len(heads) == 1, chosen.removals


# ---------------------------------------------------------------------------------------------- the pruner
def _trained(model_kw=None, steps=2, kv_heads=None, **cfg):
    model_kw = dict(model_kw or {}, **({} if kv_heads is None else {"kv_heads": kv_heads}))
    model = wrap_peft(build_llama(**model_kw))
    pruner = LoRAPruner(model, LoRAPruneConfig(layers=ALL3, **cfg))
    for i in range(steps):
        train_step(model, batch(seed=10 + i))
        pruner.importance.accumulate(model)
    return model, pruner


def _layer_params(model):
    return sum(count_parameters(layer) for layer in peft_layers(model))


def _mask(model, removed):
    """Zero the removed heads' o_proj columns and the removed channels' down_proj columns (given as positions)."""
    with torch.no_grad():
        for key, positions in removed.items():
            layer = peft_layers(model)[int(re.search(r"layers\.(\d+)\.", key).group(1))]
            if key.endswith("self_attn"):
                proj, cols = layer.self_attn.o_proj, [h * 4 + j for h in positions for j in range(4)]
            else:
                proj, cols = layer.mlp.down_proj, positions
            proj.base_layer.weight[:, cols] = 0
            proj.lora_A["default"].weight[:, cols] = 0
    return model


@pytest.mark.parametrize(
    "model_kw, cfg",
    [
        (dict(kv_heads=2), dict(uniform=False)),
        (dict(kv_heads=2), dict(head_mode="kv_groups", uniform=False)),
        (dict(kv_heads=6), dict(uniform=False)),
        (dict(kv_heads=2), dict()),
        (dict(kv_heads=6), dict(head_mode="kv_groups")),
    ],
    ids=["gqa-per_group", "gqa-kv_groups", "mha", "uniform-gqa", "uniform-mha"],
)
def test_auto_is_the_default_exact_and_on_target(model_kw, cfg):
    model, pruner = _trained(model_kw, ratio=0.4, **cfg)
    assert pruner.config.allocation == "auto" and pruner.auto and pruner.config.uniform == cfg.get("uniform", True)
    before, params = copy.deepcopy(model), _layer_params(model)
    event = pruner.prune(1.0)
    removed = params - _layer_params(model)
    unit = 3 * 72 if pruner.config.uniform else 4 * (24 + 24) * 2  # a channel of every layer; a head unit
    assert 0 <= 0.4 * params - removed < unit  # never over the budget, short of it by less than one unit
    kept_heads = {k: v for k, v in pruner.summary()["heads"].items()}
    masked = _mask(copy.deepcopy(before), event["removed"])
    if cfg.get("head_mode") == "kv_groups":  # removed KV groups also lose k/v rows: compare through the mask
        assert all(n % 3 == 0 for n in kept_heads.values())
    torch.testing.assert_close(logits(model), logits(masked), atol=1e-5, rtol=1e-5)
    if pruner.config.uniform:
        assert len(set(kept_heads.values())) == 1
        assert len(set(pruner.summary()["channels"].values())) == 1


def test_iterative_auto_events_reach_the_target_exactly():
    model = wrap_peft(build_llama(hidden=48, heads=12, kv_heads=2))
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_" in n], lr=1e-3)
    cfg = LoRAPruneConfig(layers=ALL3, ratio=0.5, total_steps=20, prune_every=2, uniform=False)
    pruner = LoRAPruner(model, cfg, optimizer=opt)
    params = _layer_params(model)
    for i in range(cfg.total_steps):
        train_step(model, batch(seed=100 + i))
        opt.step()
        snapshot = copy.deepcopy(model)
        event = pruner.step()
        opt.zero_grad()
        if event is not None:
            removed = {}
            for key, ids in event["removed"].items():  # original ids -> positions in the snapshot
                alive = _alive_before(pruner, key, ids)
                removed[key] = [alive.index(x) for x in ids]
            torch.testing.assert_close(logits(model), logits(_mask(snapshot, removed)), atol=1e-5, rtol=1e-5)
    assert len(pruner.events) >= 3
    assert 0 <= 0.5 * params - (params - _layer_params(model)) < 2 * 4 * 96


def _alive_before(pruner, key, ids):
    alive = pruner._heads[key].alive if key in pruner._heads else pruner._channels[key].alive
    return sorted(set(alive) | set(ids))


def test_the_scores_decide_heads_versus_channels():
    """Make one layer's heads nearly free (scores ~0) and every channel costly: auto takes heads there first."""
    model, pruner = _trained(uniform=False)
    imp = pruner.importance
    for name, s in imp._scores.items():
        for d in s:
            s[d] = s[d] * 1e-6 if ".layers.1.self_attn." in name else s[d] + 1.0
    event = pruner.prune(0.1)
    heads = [k for k in event["removed"] if k.endswith("self_attn")]
    assert heads == ["base_model.model.model.layers.1.self_attn"]
    assert len(event["removed"][heads[0]]) == 2  # one query head of each KV group, the cheapest unit of all


def test_ffn_only_removes_no_head_and_meets_the_target():
    model, pruner = _trained(ratio=0.3, allocation="ffn_only")
    params = _layer_params(model)
    pruner.prune(1.0)
    assert set(pruner.summary()["heads"].values()) == {6}
    assert abs(0.3 * params - (params - _layer_params(model))) <= 3 * 72 / 2


def test_guards_hold_and_an_impossible_target_is_refused_before_any_change():
    model, pruner = _trained(ratio=0.3, min_heads_per_group=3, max_layer_ratio=0.35)
    params = {i: count_parameters(layer) for i, layer in enumerate(peft_layers(model))}
    pruner.prune(1.0)
    assert set(pruner.summary()["heads"].values()) == {6}  # 3 query heads per KV group kept
    for i, layer in enumerate(peft_layers(model)):
        assert params[i] - count_parameters(layer) <= 0.35 * params[i]

    model = wrap_peft(build_llama())
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"largest reachable ratio is 0\.19") as e:
        LoRAPruner(model, LoRAPruneConfig(layers=ALL3, ratio=0.5, max_layer_ratio=0.2))
    assert "max_layer_ratio=0.2" in str(e.value)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_uniform_refuses_layers_of_different_shapes():
    model = wrap_peft(build_llama())
    pruner = LoRAPruner(model, LoRAPruneConfig(layers=[2], head_ratio=0.0, channel_ratio=0.5))  # layer 2 narrower
    train_step(model)
    pruner.importance.accumulate(model)
    pruner.prune(1.0)
    with pytest.raises(ValueError, match=re.escape("FFN widths [24, 48]")):
        LoRAPruner(model, LoRAPruneConfig(layers=ALL3, uniform=True))


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        (dict(allocation="greedy"), "greedy"),
        (dict(min_heads_per_group=0), "min_heads_per_group"),
        (dict(min_ffn_width=0), "min_ffn_width"),
        (dict(max_layer_ratio=0.0), "max_layer_ratio"),
        (dict(normalize=True), "normalize=True"),
    ],
)
def test_allocation_config_validation(kwargs, shown):
    with pytest.raises(ValueError, match=re.escape(shown)):
        LoRAPruneConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- latency target
def test_a_unit_that_saves_nothing_is_taken_only_with_the_saving_after_it():
    """Under a latency target a block's time can stay flat over several head counts: removing those heads alone
    saves nothing and costs quality, so they go only together with the unit that saves, and never at a chain's
    end."""
    from tp_loraprune.allocation import Block, Unit, allocate

    free, pays, tail = (Unit(0.1, c, {"a": (i,)}, {0: c}) for i, c in enumerate((0.0, 10.0, 0.0)))
    blocks = [Block("a", "heads", (free, pays, tail)), Block("b", "channels", (Unit(5.0, 4.0, {"b": (0,)}, {1: 4.0}),))]
    assert allocate(blocks, budget=5).removals == {"b": [0]}  # the free unit alone is not taken
    taken = allocate(blocks, budget=20)
    assert taken.removals == {"a": [0, 1], "b": [0]} and taken.cost == 14.0


def test_monotone_latency_keeps_the_faster_time_of_a_wider_block():
    """One slow outlier at a narrow width must not flatten the widths above it (timing noise only adds time)."""
    from tp_loraprune.latency import monotone

    assert monotone({0: 0.0, 5: 9.0, 6: 3.0, 32: 7.0}) == {0: 0.0, 5: 3.0, 6: 3.0, 32: 7.0}


def test_interpolated_latency_is_exact_at_the_grid_and_linear_between():
    from tp_loraprune.latency import interpolate, measured_widths

    measured = []

    def measure(width):
        measured.append(width)
        return 2.0 * width + (5.0 if width else 0.0)

    at = partial(interpolate, measured_widths(measure, full=96, step=8, points=5))
    assert sorted(measured) == [0, 8, 24, 48, 72, 96]  # multiples of the step, ends and the step, measured once
    assert at(48) == 101.0 and at(0) == 0.0
    assert at(60) == pytest.approx((at(48) + at(72)) / 2)
    assert at(95) == pytest.approx(at(96) - 2.0)
    # the fixed cost of a block with any width left is measured, not spread over the first gap (which gave 26.5)
    assert at(12) == pytest.approx(measure(12)) == 29.0


def test_latency_target_saves_the_measured_time_within_budget_and_stays_exact(flop_timer):
    with pytest.warns(UserWarning, match="target='latency' is experimental"):  # measured on an H200
        model, pruner = _trained(kv_heads=2, ratio=0.3, target="latency", latency_tokens=512, uniform=False)
    assert pruner.config.target == "latency"
    before = copy.deepcopy(model)
    event = pruner.prune(1.0)
    saved = sum(pruner._removed_by_layer().values())
    assert 0 < saved <= pruner.budget + 1e-12
    assert pruner.budget == pytest.approx(0.3 * sum(pruner._layer_totals().values()))
    torch.testing.assert_close(
        logits(model), logits(_mask(copy.deepcopy(before), event["removed"])), atol=1e-5, rtol=1e-5
    )


def test_per_group_latency_table_covers_whole_kv_groups_below_one_query_head_per_group(flop_timer):
    """per_group with 3 query heads per KV group: once a group is down to one query head, the allocation removes
    whole KV groups at the next event, so the table must time those states too, and a target that goes there prunes
    and runs."""
    with pytest.warns(UserWarning, match="experimental"):
        model, pruner = _trained(
            kv_heads=2, ratio=0.18, target="latency", latency_tokens=512, uniform=False, min_ffn_width=40
        )
    for times in pruner.latency_table.attention.values():
        assert sorted(times) == [(0, 0), (1, 1), (2, 2), (4, 2), (6, 2)]
    for progress in (0.25, 0.5, 0.75, 1.0):  # a layer at one query head per group can lose KV groups next event
        pruner.prune(progress)
    heads = [layer.self_attn.o_proj.in_features // 4 for layer in peft_layers(model)]
    assert min(heads) < 2  # some layer went below one query head per KV group
    assert torch.isfinite(logits(model)).all()


def test_a_saved_latency_table_is_reused_without_timing_and_allocates_the_same(tmp_path, monkeypatch, flop_timer):
    """A second pruner given the first one's table times nothing and, with the same scores, removes the same
    heads and channels within the same budget."""
    import tp_loraprune.latency as latency

    with pytest.warns(UserWarning, match="target='latency' is experimental"):
        model, pruner = _trained(kv_heads=2, ratio=0.3, target="latency", latency_tokens=512, uniform=False)
    path = tmp_path / "latency_table.json"
    pruner.latency_table.save(path)
    twin, scores = copy.deepcopy((model, pruner.importance))

    def no_timing(*a, **k):
        raise AssertionError("a reused latency table must not be measured again")

    monkeypatch.setattr(latency, "fastest_seconds", no_timing)
    config = LoRAPruneConfig(
        layers=ALL3, ratio=0.3, target="latency", latency_tokens=512, uniform=False, latency_table=str(path)
    )
    with pytest.warns(UserWarning, match="experimental"):
        reused = LoRAPruner(twin, config, importance=scores)
    assert reused.latency_table == pruner.latency_table  # the JSON round trip is exact
    assert reused.budget == pruner.budget
    assert reused.prune(1.0)["removed"] == pruner.prune(1.0)["removed"]


def test_a_latency_table_of_another_model_or_setting_is_refused_before_any_change(tmp_path, flop_timer):
    with pytest.warns(UserWarning, match="experimental"):
        _, pruner = _trained(kv_heads=2, ratio=0.3, target="latency", latency_tokens=512, uniform=False, steps=1)
    path = tmp_path / "t.json"
    pruner.latency_table.save(path)
    other = wrap_peft(build_llama(kv_heads=2))
    before = copy.deepcopy(other.state_dict())
    cases = [
        (dict(layers=[0, 1], latency_tokens=512), "not this model's pruned blocks"),
        (dict(layers=ALL3, latency_tokens=256), "measured for prefill at 512 tokens"),
        (dict(layers=ALL3, latency_tokens=512, head_mode="kv_groups"), "the allocation can reach"),
    ]
    for kwargs, shown in cases:
        config = LoRAPruneConfig(ratio=0.3, target="latency", uniform=False, latency_table=str(path), **kwargs)
        with pytest.warns(UserWarning, match="experimental"), pytest.raises(ValueError, match=re.escape(shown)):
            LoRAPruner(other, config)
    assert all(torch.equal(t, before[k]) for k, t in other.state_dict().items())
    (tmp_path / "bad.json").write_text('{"ffn": {}}')
    with pytest.raises(ValueError, match="is not a latency table"):
        LatencyTable.load(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        (dict(latency_table="latency_table.json"), "only under target='latency'"),
        (dict(target="latency", latency_table="/no/such/latency_table.json"), "is not a file"),
        (dict(target="latency", allocation="fixed"), "allocation='auto'"),
        (dict(target="latency", head_ratio=0.2), "head_ratio=0.2"),
        (dict(target="flops"), "flops"),
        (dict(latency_tokens=0), "latency_tokens"),
    ],
)
def test_latency_config_validation(kwargs, shown):
    with pytest.raises(ValueError, match=re.escape(shown)):
        LoRAPruneConfig(**kwargs)
