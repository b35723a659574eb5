"""The product around the pruner: export round trips, the training driver with checkpoint/resume, the
Trainer callback, and the CLI's up-front checks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import batch, build_llama, logits, train_step, wrap_peft

from tp_loraprune import LoRAPruneConfig, LoRAPruner, load_pruned, save_pruned
from tp_loraprune.export import MANIFEST, merge_lora
from tp_loraprune.lora import lora_factors, lora_layers
from tp_loraprune.optim_state import trainable_parameters_match
from tp_loraprune.train import TrainConfig, prepare_lora_model, prune


def _pruned(layers):
    model = wrap_peft(build_llama())
    train_step(model)
    pruner = LoRAPruner(model, LoRAPruneConfig(head_ratio=0.34, channel_ratio=0.25, layers=layers))
    pruner.importance.accumulate(model)
    pruner.prune(1.0)
    return model


@pytest.mark.parametrize("layers, layout", [([1], "per_layer"), ([0, 1, 2], "uniform")])
def test_save_load_round_trip_gives_same_logits(tmp_path, layers, layout):
    model = _pruned(layers)
    expected = logits(model)
    out = save_pruned(model, tmp_path / "m")
    assert json.loads((out / MANIFEST).read_text())["layout"] == layout
    assert (out / "model.safetensors").is_file() or any(out.glob("*.safetensors"))
    reloaded = load_pruned(out)
    torch.testing.assert_close(logits(reloaded), expected, atol=1e-5, rtol=0)
    if layout == "uniform":
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(out)
        torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=0)


def test_save_refuses_to_overwrite(tmp_path):
    model = _pruned([1])
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="exists and is not empty"):
        save_pruned(model, tmp_path / "m")
    assert (tmp_path / "m" / "keep.txt").read_text() == "user data"


def test_load_pruned_rejects_foreign_directory(tmp_path):
    with pytest.raises(ValueError, match="not saved by tp_loraprune"):
        load_pruned(tmp_path)


def _run(tmp_path=None, lora_init="default", **kwargs):
    blocks = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(0))
    config = LoRAPruneConfig(ratio=0.3, layers=[0, 1, 2], total_steps=20, prune_every=2)
    train = TrainConfig(
        lr=1e-2, batch_size=2, block_size=12, lora_r=2, lora_init=lora_init, progress=False, checkpoint_every=3
    )
    return prune(build_llama(), None, blocks, config, train, **kwargs)


@pytest.mark.parametrize("lora_init", ["default", "pissa_niter_2"])
def test_resume_ends_with_the_same_architecture(tmp_path, lora_init):
    full = _run(lora_init=lora_init)
    ckpt = tmp_path / "ckpt"
    partial = _run(lora_init=lora_init, checkpoint_dir=ckpt, stop_after=9)
    assert partial.summary["parameters"] > full.summary["parameters"]  # stopped mid-way
    resumed = _run(lora_init=lora_init, checkpoint_dir=ckpt, resume=True)
    assert [e["removed"] for e in resumed.events] == [e["removed"] for e in full.events]
    assert resumed.summary["parameters"] == full.summary["parameters"]
    assert resumed.losses == pytest.approx(full.losses)
    torch.testing.assert_close(logits(resumed.model), logits(full.model), atol=1e-6, rtol=0)


def test_lora_init_must_be_one_the_pruner_supports():
    with pytest.raises(ValueError, match="lora_init.*'svd'"):
        TrainConfig(lora_init="svd")
    with pytest.raises(ValueError, match="lora_init"):
        TrainConfig(lora_init="pissa_niter_0")


@pytest.mark.parametrize("lora_init", ["pissa", "auto", "olora"])  # auto: PiSSA on a float base
def test_pissa_init_starts_from_the_same_model_and_merges_exactly_after_pruning(lora_init):
    model = build_llama()
    dense = logits(model)
    peft_model = prepare_lora_model(model, TrainConfig(lora_r=2, lora_alpha=4, lora_dropout=0.0, lora_init=lora_init))
    torch.testing.assert_close(logits(peft_model), dense, atol=1e-5, rtol=0)  # residual + s·B·A is the weight
    layers = lora_layers(peft_model).values()
    assert all(layer.lora_B["default"].weight.abs().sum() > 0 for layer in layers)  # B starts non-zero
    train_step(peft_model)
    assert all(lora_factors(layer).dA.abs().sum() > 0 for layer in layers)  # so ∂L/∂A carries signal at once
    pruner = LoRAPruner(peft_model, LoRAPruneConfig(head_ratio=0.34, channel_ratio=0.25))
    pruner.importance.accumulate(peft_model)
    pruner.prune(1.0)
    pruned = logits(peft_model)
    torch.testing.assert_close(logits(merge_lora(peft_model)), pruned, atol=1e-5, rtol=0)


def test_pruner_warns_when_lora_starts_at_b_zero_and_points_to_pissa():
    import warnings

    default_init = prepare_lora_model(build_llama(), TrainConfig(lora_r=2, lora_init="default"))
    with pytest.warns(UserWarning, match="init_lora_weights='pissa_niter_4'"):
        LoRAPruner(default_init, LoRAPruneConfig(ratio=0.2))
    pissa = prepare_lora_model(build_llama(), TrainConfig(lora_r=2, lora_init="auto"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoRAPruner(pissa, LoRAPruneConfig(ratio=0.2))


def test_driver_keeps_loss_finite_and_reaches_target():
    result = _run()
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.summary["parameters"] < result.summary["initial_parameters"]
    assert result.events and result.events[-1]["parameters"] == result.summary["parameters"]


def test_trainer_callback_prunes_and_keeps_optimizer_consistent(tmp_path):
    from transformers import Trainer, TrainingArguments

    from tp_loraprune import LoRAPruneCallback

    model = wrap_peft(build_llama())
    data = [{"input_ids": b, "labels": b} for b in torch.randint(0, 64, (32, 12))]
    callback = LoRAPruneCallback(LoRAPruneConfig(ratio=0.3, layers=[0, 1, 2], prune_every=2))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=100,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    pruner = callback.pruner
    assert pruner.config.total_steps == 12 and pruner.progress == 1.0
    assert pruner.parameters < pruner.initial_parameters
    assert trainable_parameters_match(pruner.optimizer, model)
    for p in model.parameters():
        if p in pruner.optimizer.state:
            assert pruner.optimizer.state[p]["exp_avg"].shape == p.shape
    merged = copy.deepcopy(model).merge_and_unload()
    assert merged.generate(batch()[:, :4], max_new_tokens=3, do_sample=False).shape[1] == 7


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ratio", "1.5"], "ratio"),
        (["--ratio", "-0.1"], "ratio"),
        (["--prune-every", "100", "--steps", "20"], "prune_every"),
        (["--data", "/nonexistent/file.txt"], "does not exist|not found|No such"),
    ],
)
def test_cli_rejects_bad_input_before_any_work(tmp_path, argv, message, monkeypatch):
    from tp_loraprune import cli

    def no_model(*a, **k):  # reaching the model load means a check came too late
        raise AssertionError("model was loaded before the input was checked")

    monkeypatch.setattr("tp_loraprune.loading.load_model_and_tokenizer", no_model)
    with pytest.raises(SystemExit, match=message):
        cli.main(["prune", "--out", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()


def test_cli_refuses_existing_output_dir(tmp_path):
    from tp_loraprune import cli

    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    with pytest.raises(SystemExit, match="already exists"):
        cli.main(["prune", "--out", str(out)])
    assert (out / "mine.txt").read_text() == "x"


def test_pruner_without_lora_says_how_to_wrap():
    with pytest.raises(ValueError, match="get_peft_model"):
        LoRAPruner(build_llama(), LoRAPruneConfig())


def test_global_ranking_removes_the_same_total_but_unevenly():
    model = wrap_peft(build_llama())
    train_step(model)
    pruner = LoRAPruner(model, LoRAPruneConfig(head_ratio=0.0, channel_ratio=0.5, layers=[0, 1, 2], ranking="global"))
    pruner.importance.accumulate(model)
    scores = {}
    from tp_loraprune.graph import build_graph

    graph = build_graph(model)
    for key, group in pruner._channel_groups(graph).items():
        scores.update({(key, i): float(v) for i, v in enumerate(pruner.importance(group))})
    event = pruner.prune(1.0)
    removed = {(k, i) for k, ids in event["removed"].items() for i in ids}
    assert len(removed) == 3 * 24  # the same total as local ranking (half of 3 x 48)
    kept = set(scores) - removed
    assert max(scores[r] for r in removed) <= min(scores[k] for k in kept)  # the globally lowest went


@pytest.mark.parametrize("ranking", ["local", "global"])
def test_round_to_keeps_every_ffn_width_at_a_multiple(ranking):
    """round_to=8 on FFN width 48 at a 40% channel ratio (28.8 kept): every pruned width is a multiple of 8 in
    both ranking modes; global ranking keeps back each group's highest-scoring picks to round its width up."""
    model = wrap_peft(build_llama())
    train_step(model)
    config = LoRAPruneConfig(head_ratio=0.0, channel_ratio=0.4, layers=[0, 1, 2], ranking=ranking, round_to=8)
    pruner = LoRAPruner(model, config)
    pruner.importance.accumulate(model)
    pruner.prune(1.0)
    widths = list(pruner.summary()["channels"].values())
    assert all(w % 8 == 0 and 0 < w <= 48 for w in widths), widths
    assert abs(sum(widths) - 3 * 28.8) <= 3 * 8, widths  # within one multiple per group of the target
    assert pruner.summary()["channel_multiple"] == 8
