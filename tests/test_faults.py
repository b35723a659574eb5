"""Fault injection: kills of the CLI at several points, full disks, unwritable outputs, corrupt checkpoint
and output files, non-finite training, a foreign checkpoint, offline hubs.

Each case asserts a clear error (naming the file or the value, and the fix), that nothing finished is
lost, and that no silently wrong model is saved or loaded. The kills run the real CLI in a subprocess
(`tests/fault_runner.py`, SIGKILL at a named point) on a tiny LLaMA saved to disk; the rest runs in-process.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import build_llama, save_tiny_hf
from tiny_tokenizer import tiny_tokenizer

from tp_loraprune import LoRAPruneConfig, LoRAPruner, load_pruned, save_pruned
from tp_loraprune.checkpoint import IMPORTANCE, LATEST, MODEL, OPTIMIZER, STATE, checkpoint_dir, save_checkpoint
from tp_loraprune.data import builtin_text_documents, hub_offline
from tp_loraprune.export import COMPLETE, MANIFEST
from tp_loraprune.integrity import NonFiniteError
from tp_loraprune.train import TrainConfig, prune

HERE = Path(__file__).parent
STEPS = 6


# ------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaMA + tokenizer saved as a local HF directory, and a small text file."""
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_hf(root / "model")
    (root / "data.txt").write_text("\n\n".join(builtin_text_documents()[:6]))
    return root


def cli_args(tiny: Path, out: Path, *extra: str) -> list[str]:
    return [
        "prune",
        *("--model", str(tiny / "model"), "--data", str(tiny / "data.txt"), "--out", str(out)),
        *("--steps", str(STEPS), "--prune-every", "2", "--batch-size", "2", "--block-size", "16"),
        *("--max-blocks", "12", "--heldout", "2", "--lora-r", "2", "--ratio", "0.3"),
        *extra,
    ]


def run_cli(fault: str, n: int, argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    return subprocess.run(
        [sys.executable, str(HERE / "fault_runner.py"), fault, str(n), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_pruned(path).state_dict()


def assert_same_model(path: Path, reference: dict[str, torch.Tensor]) -> None:
    got = weights(path)
    assert got.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(got[name], tensor), name


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The weights saved by an uninterrupted CLI run without checkpoints (in-process)."""
    from tp_loraprune import cli

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference") / "out"
    assert cli.main(cli_args(tiny, out)) == 0
    return weights(out)


def latest(ckpt: Path) -> str:
    return json.loads((ckpt / LATEST).read_text())["checkpoint"]


# ------------------------------------------------------------------------------------------- kills
def test_cli_killed_at_every_point_and_resumed_saves_the_uninterrupted_model(tiny, reference, tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "out.checkpoint"
    argv = cli_args(tiny, out, "--checkpoint-every", "2")
    resume = [*argv, "--resume"]

    killed = run_cli("before_checkpoint", 2, argv)  # killed at step 4, before its checkpoint
    assert killed.returncode == -9, killed.stderr
    assert latest(ckpt) == "step-00000002" and not out.exists()

    killed = run_cli("during_checkpoint", 1, resume)  # tensors of step 4 written, its state.json not yet
    assert killed.returncode == -9, killed.stderr
    assert "resuming from the checkpoint at step 2" in killed.stdout
    assert "| 2/6" in killed.stderr and "| 0/6" not in killed.stderr  # the progress bar starts at the resumed step
    assert latest(ckpt) == "step-00000002"  # the complete checkpoint is untouched
    assert (ckpt / ".step-00000004.tmp").is_dir() and not out.exists()

    killed = run_cli("after_checkpoint", 1, resume)  # checkpoint of step 4 in place, then killed
    assert killed.returncode == -9, killed.stderr
    assert latest(ckpt) == "step-00000004"
    assert sorted(p.name for p in ckpt.iterdir()) == [LATEST, "step-00000004"]  # the old one and debris removed

    killed = run_cli("during_save", 1, resume)  # every output file written but the completion marker
    assert killed.returncode == -9, killed.stderr
    assert latest(ckpt) == f"step-0000000{STEPS}"  # a final checkpoint precedes the merge and save
    assert not out.exists() and (tmp_path / "out.partial").is_dir()
    with pytest.raises(ValueError, match="interrupted"):
        load_pruned(out)

    killed = run_cli("after_save", 1, resume)  # saved, killed before the checkpoints are removed
    assert killed.returncode == -9, killed.stderr
    assert "resuming from the checkpoint at step 6" in killed.stdout
    assert (out / COMPLETE).is_file() and ckpt.is_dir() and not (tmp_path / "out.partial").exists()
    assert_same_model(out, reference)

    done = run_cli("none", 0, resume)
    assert done.returncode == 0, done.stderr
    assert "already holds the finished model" in done.stdout and not ckpt.exists()
    assert_same_model(out, reference)
    report = json.loads((out / "report.json").read_text())
    assert report["saved_to"] == str(out) and (out / "prune_log.json").is_file()


def test_cli_checkpointed_run_removes_its_checkpoints_and_refuses_a_stale_one(tiny, reference, tmp_path):
    from tp_loraprune import cli

    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    assert cli.main(cli_args(tiny, out, "--checkpoint-every", "4", "--checkpoint-dir", str(ckpt))) == 0
    assert_same_model(out, reference)
    assert not ckpt.exists()  # a finished, saved run keeps no checkpoint
    ckpt.mkdir()
    (ckpt / LATEST).write_text("{}")
    with pytest.raises(SystemExit, match="--resume to continue it"):
        cli.main(cli_args(tiny, tmp_path / "out2", "--checkpoint-every", "4", "--checkpoint-dir", str(ckpt)))


# ------------------------------------------------------------------------------------------- full disk, unwritable
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _full_from_file(n: int, monkeypatch) -> None:
    """safetensors' writer fails (as on a full disk, with its own error type) from its n-th file on."""
    import safetensors.torch
    from safetensors import SafetensorError

    save_file, calls = safetensors.torch.save_file, [0]

    def full(*args, **kwargs):
        calls[0] += 1
        if calls[0] >= n:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full)


def test_cli_checkpoint_on_a_full_disk_stops_clearly_and_resumes(tiny, reference, tmp_path, monkeypatch):
    from tp_loraprune import cli

    out, ckpt = tmp_path / "out", tmp_path / "out.checkpoint"
    argv = cli_args(tiny, out, "--checkpoint-every", "2")
    _full_from_file(4, monkeypatch)  # three files per checkpoint: the second one fails
    with pytest.raises(SystemExit, match="step 4 .* failed .*No space left.* previous checkpoint is kept"):
        cli.main(argv)
    assert sorted(p.name for p in ckpt.iterdir()) == [LATEST, "step-00000002"] and not out.exists()
    monkeypatch.undo()
    assert cli.main([*argv, "--resume"]) == 0
    assert_same_model(out, reference)


def test_cli_final_save_on_a_full_disk_keeps_the_model_in_a_rescue_dir(tiny, reference, tmp_path, monkeypatch):
    from tp_loraprune import cli, export

    out, ckpt = tmp_path / "out", tmp_path / "out.checkpoint"
    rescue_root = tmp_path / "elsewhere"
    rescue_root.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(rescue_root))
    write = export._write_model

    def full_beside_out(model, path, *args):
        if path.parent == tmp_path:
            _no_space()
        write(model, path, *args)

    monkeypatch.setattr(export, "_write_model", full_beside_out)
    with pytest.raises(SystemExit, match="saved to .* instead") as e:
        cli.main(cli_args(tiny, out, "--checkpoint-every", "3"))
    assert "No space left" in str(e.value) and "--resume" in str(e.value)
    assert not out.exists() and not (tmp_path / "out.partial").exists()  # the partial save gave its space back
    (rescued,) = rescue_root.iterdir()
    assert_same_model(rescued, reference)
    assert latest(ckpt) == f"step-0000000{STEPS}"  # and the final checkpoint is kept
    monkeypatch.setattr(export, "_write_model", write)
    assert cli.main([*cli_args(tiny, out, "--checkpoint-every", "3"), "--resume"]) == 0
    assert_same_model(out, reference)


def test_cli_refuses_an_output_without_room_before_training(tiny, tmp_path, monkeypatch):
    from tp_loraprune import cli

    def no_training(*a, **k):
        raise AssertionError("training started before the free space was checked")

    monkeypatch.setattr("tp_loraprune.train.prune", no_training)
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9 - 4096, free=4096))
    with pytest.raises(SystemExit, match=r"has 0\.0 MB free but this run needs about .* for --out"):
        cli.main(cli_args(tiny, tmp_path / "out", "--checkpoint-every", "2"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["parent is a file", "permission denied"])
def test_cli_refuses_an_unwritable_output_before_loading_the_model(tmp_path, monkeypatch, case):
    from tp_loraprune import cli

    def no_model(*a, **k):
        raise AssertionError("model was loaded before --out was checked")

    monkeypatch.setattr("tp_loraprune.loading.load_model_and_tokenizer", no_model)
    out = tmp_path / "out"
    if case == "parent is a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
        message = "is a file, not a directory"
    else:

        def denied(*a, **k):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr("tp_loraprune.integrity.tempfile.mkstemp", denied)
        message = "cannot be written .*Permission denied"
    with pytest.raises(SystemExit, match=message):
        cli.main(["prune", "--out", str(out)])


# ------------------------------------------------------------------------------------------- API runs
BLOCKS = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(0))


def _run(model=None, blocks=BLOCKS, lr=1e-2, **kwargs):
    config = LoRAPruneConfig(ratio=0.3, layers=[0, 1, 2], total_steps=8, prune_every=2)
    train = TrainConfig(lr=lr, batch_size=2, block_size=12, lora_r=2, progress=False, checkpoint_every=2)
    return prune(model or build_llama(), None, blocks, config, train, **kwargs)


@pytest.fixture(scope="module")
def full_run():
    return _run()


@pytest.fixture(scope="module")
def stopped_checkpoint(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("stopped") / "ckpt"
    _run(checkpoint_dir=ckpt, stop_after=4)
    return ckpt


@pytest.fixture
def ckpt(stopped_checkpoint, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(stopped_checkpoint, copy)
    return copy


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(full_run, tmp_path, monkeypatch):
    _full_from_file(4, monkeypatch)  # three files per checkpoint: the second one fails
    with pytest.raises(OSError, match="No space left"):
        _run(checkpoint_dir=tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [LATEST, "step-00000002"]  # no debris
    monkeypatch.undo()
    resumed = _run(checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert resumed.losses == pytest.approx(full_run.losses)
    assert [e["removed"] for e in resumed.events] == [e["removed"] for e in full_run.events]


def test_checkpoint_interrupted_before_latest_moves_resumes_the_previous_one(ckpt, full_run, monkeypatch):
    from tp_loraprune import checkpoint

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_publish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(checkpoint_dir=ckpt, resume=True)
    assert latest(ckpt) == "step-00000004" and (ckpt / "step-00000006").is_dir()  # new one complete, not named
    monkeypatch.undo()
    resumed = _run(checkpoint_dir=ckpt, resume=True)
    assert resumed.losses == pytest.approx(full_run.losses)


def _damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "flipped":
        i = len(data) // 2
        file.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :])
    else:
        file.unlink()


@pytest.mark.parametrize("how", ["truncated", "flipped", "deleted"])
@pytest.mark.parametrize("part", [LATEST, STATE, MODEL, OPTIMIZER, IMPORTANCE])
def test_resume_from_a_damaged_checkpoint_names_the_file(ckpt, part, how):
    file = ckpt / part if part == LATEST else checkpoint_dir(ckpt) / part
    _damage(file, how)
    pattern = f"{part}|{LATEST}" if how == "deleted" and part == LATEST else part
    with pytest.raises(ValueError, match=pattern) as e:
        _run(checkpoint_dir=ckpt, resume=True)
    assert str(ckpt) in str(e.value) and ("Delete" in str(e.value) or "start" in str(e.value))


@pytest.mark.parametrize(
    "change, differs",
    [
        ({"model": "other weights"}, "model: checkpoint"),
        ({"blocks": "other data"}, "data: checkpoint"),
        ({"lr": 2e-2}, "train.lr: checkpoint 0.01, this run 0.02"),
    ],
)
def test_resume_onto_another_model_or_data_is_refused_with_what_differs(ckpt, change, differs):
    kwargs: dict = {}
    if "model" in change:
        kwargs["model"] = build_llama(seed=1)  # the same shape, other weights
    if "blocks" in change:
        kwargs["blocks"] = BLOCKS.flip(0)
    if "lr" in change:
        kwargs["lr"] = change["lr"]
    with pytest.raises(ValueError, match="belongs to another run") as e:
        _run(checkpoint_dir=ckpt, resume=True, **kwargs)
    assert differs in str(e.value) and str(ckpt) in str(e.value)
    assert str(e.value).count(": checkpoint") == 1  # only what differs is listed


# ------------------------------------------------------------------------------------------- older checkpoints
def _as_written_before_the_new_settings(ckpt: Path, *, fingerprint: bool = True) -> None:
    """Rewrite the latest checkpoint in `ckpt` as the versions before LEGACY_SETTINGS' settings wrote it: without
    them (and, with fingerprint=False, without the fingerprint, as the first checkpoint format). The run must
    have used the legacy values, so the rewritten checkpoint is one those versions would have written."""
    from tp_loraprune.checkpoint import LEGACY_SETTINGS
    from tp_loraprune.integrity import file_record

    where = checkpoint_dir(ckpt)
    state = json.loads((where / STATE).read_text())
    sections = [("config", state["pruner"]["config"])]
    sections += [("config", state["fingerprint"]["config"]), ("train", state["fingerprint"]["train"])]
    for section, settings in sections:
        for key, value in LEGACY_SETTINGS[section].items():
            assert settings.pop(key) == value, (section, key)
    if not fingerprint:
        del state["fingerprint"]
    (where / STATE).write_text(json.dumps(state))
    latest_json = json.loads((ckpt / LATEST).read_text())
    (ckpt / LATEST).write_text(json.dumps(dict(latest_json, state=file_record(where / STATE)["sha256"])))


def _legacy_run(allocation="fixed", uniform=False, **kwargs):
    """`_run` with the settings every checkpoint had before `allocation` and `lora_init` existed."""
    config = LoRAPruneConfig(
        ratio=0.3,
        layers=[0, 1, 2],
        total_steps=8,
        prune_every=2,
        allocation=allocation,
        uniform=uniform,
        gradient="eq10",
    )
    train = TrainConfig(
        lr=1e-2, batch_size=2, block_size=12, lora_r=2, progress=False, checkpoint_every=2, lora_init="default"
    )
    return prune(build_llama(), None, BLOCKS, config, train, **kwargs)


@pytest.mark.parametrize("fingerprint", [True, False], ids=["fingerprinted", "first-format"])
def test_a_checkpoint_older_than_its_settings_resumes_as_it_ran(tmp_path, fingerprint):
    full = _legacy_run()
    ckpt = tmp_path / "ckpt"
    _legacy_run(checkpoint_dir=ckpt, stop_after=4)
    _as_written_before_the_new_settings(ckpt, fingerprint=fingerprint)
    with pytest.raises(ValueError, match="belongs to another run") as e:  # today's defaults: allocation="auto"
        _legacy_run(allocation="auto", uniform=True, checkpoint_dir=ckpt, resume=True)
    message = str(e.value)
    assert 'config.allocation: checkpoint "fixed", this run "auto"' in message
    assert "config.uniform: checkpoint false, this run true" in message
    assert "written before `allocation`, `uniform` existed" in message and "\n" not in message
    resumed = _legacy_run(checkpoint_dir=ckpt, resume=True)  # allocation="fixed": what it ran with
    assert resumed.losses == pytest.approx(full.losses)
    assert [e["removed"] for e in resumed.events] == [e["removed"] for e in full.events]


def test_cli_resume_of_an_older_checkpoint_takes_its_settings_for_flags_left_out(tiny, tmp_path, monkeypatch, capsys):
    from tp_loraprune import checkpoint, cli

    legacy = [
        "--allocation",
        "fixed",
        "--no-uniform",
        "--round-to",
        "1",
        "--lora-init",
        "default",
        "--gradient",
        "eq10",
    ]
    reference = tmp_path / "reference"
    assert cli.main(cli_args(tiny, reference, *legacy)) == 0
    out = tmp_path / "out"
    save, calls = checkpoint.save_checkpoint, [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(cli_args(tiny, out, "--checkpoint-every", "2", *legacy))
    monkeypatch.undo()
    ckpt = tmp_path / "out.checkpoint"
    assert latest(ckpt) == "step-00000002"
    _as_written_before_the_new_settings(ckpt)
    capsys.readouterr()
    resume = cli_args(tiny, out, "--checkpoint-every", "2", "--resume")  # today's defaults would be auto, 8, ...
    with pytest.raises(SystemExit, match='config.allocation: checkpoint "fixed", this run "auto"'):
        cli.main([*resume, "--allocation", "auto"])  # a flag that is given must match
    assert cli.main(resume) == 0
    text = capsys.readouterr().out
    assert (
        "resuming with the checkpoint's values of flags this command leaves out: --allocation fixed --no-uniform "
        "--round-to 1 --gradient eq10 --lora-init default" in text
    )
    assert_same_model(out, weights(reference))


# ------------------------------------------------------------------------------------------- non-finite values
def test_non_finite_lr_is_refused_up_front(tmp_path, monkeypatch):
    from tp_loraprune import cli

    with pytest.raises(ValueError, match="finite number > 0, got inf"):
        TrainConfig(lr=math.inf)
    monkeypatch.setattr("tp_loraprune.loading.load_model_and_tokenizer", lambda *a, **k: 1 / 0)
    with pytest.raises(SystemExit, match="lr"):
        cli.main(["prune", "--lr", "inf", "--steps", "1", "--prune-every", "1", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["weights", "gradient", "loss"])
def test_non_finite_step_stops_with_the_step_and_saves_nothing(tmp_path, monkeypatch, where):
    step_fn, clip, calls = torch.optim.AdamW.step, torch.nn.utils.clip_grad_norm_, [0]

    def poisoned_step(self, *args, **kwargs):
        result = step_fn(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(math.nan)
        return result

    def nan_norm(parameters, max_norm, *args, **kwargs):
        calls[0] += 1
        return torch.tensor(math.nan) if calls[0] == 3 else clip(parameters, max_norm, *args, **kwargs)

    if where == "weights":
        monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
        message = "LoRA weights became non-finite in the optimizer step of step 2"
    elif where == "gradient":
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_norm)
        message = "gradient norm became nan at step 2"
    else:
        message = "loss became (inf|nan) at step 1"
    with pytest.raises(NonFiniteError, match=message) as e:
        _run(checkpoint_dir=tmp_path / "ckpt", lr=1e30 if where == "loss" else 1e-2)
    assert isinstance(e.value, ValueError) and "--lr" in str(e.value)
    if where != "loss":
        assert latest(tmp_path / "ckpt") == "step-00000002"  # the last finite checkpoint, nothing after it


def test_non_finite_weights_are_never_saved(tmp_path):
    model = build_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteError, match="model.layers.1.mlp.up_proj.weight holds inf or NaN"):
        save_pruned(model, tmp_path / "m", merge=False)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


def test_checkpoint_refuses_non_finite_scores(tmp_path, peft_gqa, step):
    optimizer = torch.optim.AdamW([p for p in peft_gqa.parameters() if p.requires_grad])
    pruner = LoRAPruner(peft_gqa, LoRAPruneConfig(total_steps=20), optimizer=optimizer)
    step(peft_gqa, optimizer=optimizer)
    pruner.step()
    name = next(iter(pruner.importance._scores))
    pruner.importance._scores[name]["out"][0] = math.nan
    with pytest.raises(NonFiniteError, match="importance scores"):
        save_checkpoint(tmp_path / "ckpt", peft_gqa, optimizer, pruner)
    assert not any((tmp_path / "ckpt").iterdir())


# ------------------------------------------------------------------------------------------- saved models
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from conftest import train_step, wrap_peft

    model = wrap_peft(build_llama())
    train_step(model)
    pruner = LoRAPruner(model, LoRAPruneConfig(head_ratio=0.34, channel_ratio=0.25, layers=[1]))
    pruner.importance.accumulate(model)
    pruner.prune(1.0)
    return save_pruned(model, tmp_path_factory.mktemp("saved") / "m", tiny_tokenizer())


@pytest.fixture
def saved_copy(saved, tmp_path):
    return Path(shutil.copytree(saved, tmp_path / "m"))


def test_saved_model_lists_every_file_in_its_completion_marker(saved):
    files = json.loads((saved / COMPLETE).read_text())["files"]
    assert set(files) == {p.name for p in saved.iterdir()} - {COMPLETE}
    assert {MANIFEST, "model.safetensors", "config.json", "tokenizer.json"} <= set(files)
    load_pruned(saved)


@pytest.mark.parametrize("how", ["truncated", "flipped", "deleted"])
@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json", MANIFEST, COMPLETE])
def test_load_pruned_refuses_a_damaged_save_and_names_the_file(saved_copy, name, how):
    _damage(saved_copy / name, how)
    if name == MANIFEST and how == "deleted":
        pattern = "has no tp_loraprune.json"
    elif name == COMPLETE and how == "deleted":
        pattern = f"incomplete: {COMPLETE}, which save_pruned writes last, is missing"
    else:
        pattern = name.replace(".", r"\.")
    with pytest.raises(ValueError, match=pattern):
        load_pruned(saved_copy)


def test_load_pruned_without_hashing_still_checks_sizes(saved_copy):
    _damage(saved_copy / "model.safetensors", "flipped")
    load_pruned(saved_copy, verify=False)  # sizes match: only the sha256 would tell
    _damage(saved_copy / "model.safetensors", "truncated")
    with pytest.raises(ValueError, match="truncated"):
        load_pruned(saved_copy, verify=False)


def test_load_pruned_still_loads_a_format_1_directory(saved_copy):
    """Saved before the completion marker existed: no marker, format_version 1."""
    manifest = json.loads((saved_copy / MANIFEST).read_text())
    (saved_copy / MANIFEST).write_text(json.dumps(dict(manifest, format_version=1)))
    (saved_copy / COMPLETE).unlink()
    load_pruned(saved_copy)


def test_overwrite_replaces_a_complete_save_whole(saved, saved_copy):
    (saved_copy / "stale.txt").write_text("old")
    model = load_pruned(saved)
    save_pruned(model, saved_copy, merge=False, overwrite=True)
    assert not (saved_copy / "stale.txt").exists() and not saved_copy.with_name("m.old").exists()
    load_pruned(saved_copy)


# ------------------------------------------------------------------------------------------- offline hubs
@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True)])
@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_truthy_offline_values_give_the_clear_message(monkeypatch, variable, value, offline):
    import huggingface_hub.constants

    from tp_loraprune.loading import load_model_and_tokenizer

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    assert hub_offline() == f"{variable}={value}"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what the hub reads at import
    with pytest.raises(ValueError, match=f"not a local path and {variable}={value} forbids the hub"):
        load_model_and_tokenizer("no-such-org/no-such-model")


@pytest.mark.parametrize("value", ["0", "false", "no", "off", ""])
def test_falsy_offline_values_are_not_offline(monkeypatch, value):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, value)
    assert hub_offline() is None


def test_cli_with_hf_hub_offline_true_fails_with_the_message(tmp_path):
    """The issue's case: HF_HUB_OFFLINE=true (not 1) in a fresh process, where the hub reads it at import."""
    env = dict(os.environ, HF_HUB_OFFLINE="true", PYTHONPATH=str(HERE.parent))
    env.pop("TRANSFORMERS_OFFLINE", None)
    code = (
        "from tp_loraprune.loading import load_model_and_tokenizer\n"
        "try:\n    load_model_and_tokenizer('no-such-org/no-such-model')\n"
        "except ValueError as e:\n    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "HF_HUB_OFFLINE=true forbids the hub" in done.stdout, done.stderr
