"""Evaluation as in the LLM-pruning papers: WikiText-2 / PTB perplexity and lm-eval zero-shot accuracy.

Data come from a local, offline data directory (see :func:`find_data_dir`), laid out as
``shared/data`` (``wikitext-2/``, ``ptb/``, ``lm_eval_tasks/`` ...). ``lm_eval`` and ``datasets``
are imported only inside :func:`zero_shot`, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["find_data_dir", "perplexity_text", "perplexity", "zero_shot", "evaluate", "ZERO_SHOT_TASKS"]

DATA_ENV_VAR = "TP_LORAPRUNE_DATA"
ZERO_SHOT_TASKS = (
    "piqa_local",
    "hellaswag_local",
    "winogrande_local",
    "arc_easy_local",
    "arc_challenge_local",
    "boolq_local",
    "openbookqa_local",
)
# name -> (file inside the data dir, JSON field, joiner), as the papers build the scored string
_PPL_SOURCES = {
    "wikitext2": ("wikitext-2/wikitext-2-raw-v1.test.jsonl", "text", "\n\n"),
    "ptb": ("ptb/ptb_text_only.test.jsonl", "sentence", " "),
}


def _data_dir_candidates(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir)]
    if os.environ.get(DATA_ENV_VAR):
        return [Path(os.environ[DATA_ENV_VAR])]
    repo_root = Path(__file__).resolve().parent.parent
    candidates = [(Path.cwd() / ".." / "shared" / "data").resolve(), (repo_root / ".." / "shared" / "data").resolve()]
    return list(dict.fromkeys(candidates))  # one entry when the current directory is the repository root


def find_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Locate the evaluation data directory, or return None when it is absent.

    Order: the explicit ``data_dir``, else ``$TP_LORAPRUNE_DATA``, else ``../shared/data`` relative to
    the current directory, else ``../shared/data`` relative to the repository root. An explicit
    argument or environment variable is not second-guessed: if it is not a directory, None is returned.
    """
    for candidate in _data_dir_candidates(data_dir):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def _require_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    found = find_data_dir(data_dir)
    if found is None:
        looked = ", ".join(str(p) for p in _data_dir_candidates(data_dir))
        raise ValueError(
            f"evaluation data directory not found (looked at: {looked}); point --data-dir (Python: data_dir=) or "
            f"${DATA_ENV_VAR} at the folder holding wikitext-2/, ptb/ and lm_eval_tasks/."
        )
    return found


def perplexity_text(name: str, data_dir: str | os.PathLike[str] | None = None) -> str:
    """Return the test string the papers score: ``"wikitext2"`` (rows joined by blank lines) or ``"ptb"``."""
    if name not in _PPL_SOURCES:
        raise ValueError(f"unknown perplexity dataset {name!r}; choose one of {sorted(_PPL_SOURCES)}.")
    rel, field, joiner = _PPL_SOURCES[name]
    path = _require_data_dir(data_dir) / rel
    if not path.is_file():
        raise ValueError(
            f"{name} test file missing: {path}; point data_dir / {DATA_ENV_VAR} at a complete data folder."
        )
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return joiner.join(row[field] for row in rows)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    *,
    seq_len: int = 512,
    batch_size: int = 4,
    max_windows: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> float:
    """Perplexity of ``text`` with the SparseGPT/Wanda protocol.

    The whole text is tokenized once and cut into non-overlapping windows of ``seq_len`` tokens (the
    remainder is dropped, at most ``max_windows`` windows are used); the result is exp of the mean
    next-token NLL over all predicted tokens of all windows. The model's train/eval mode is restored.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (one context and one predicted token), got {seq_len}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}.")
    device = torch.device(device) if device is not None else _model_device(model)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    n_windows = ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(
            f"text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}; "
            "use a longer text or a smaller seq_len."
        )
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    return blocks_perplexity(model, windows, batch_size=batch_size, device=device, progress=progress)


def blocks_perplexity(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> float:
    """exp of the mean next-token NLL over all predicted tokens of token ``blocks`` (n, seq_len)."""
    if blocks.dim() != 2 or blocks.shape[0] < 1 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must have shape (n >= 1, seq_len >= 2), got {tuple(blocks.shape)}.")
    device = torch.device(device) if device is not None else _model_device(model)
    starts: Iterable[int] = range(0, len(blocks), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", unit="batch")
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    with _eval_mode(model), torch.no_grad():
        for start in starts:
            batch = blocks[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            for row_logits, row_ids in zip(logits, batch, strict=True):  # row by row: small fp32 copy
                nll_sum += F.cross_entropy(row_logits[:-1].float(), row_ids[1:], reduction="sum")
    return math.exp(nll_sum.item() / (blocks.shape[0] * (blocks.shape[1] - 1)))


@contextlib.contextmanager
def _offline_in_dir(path: Path) -> Iterator[None]:
    """Run inside ``path`` with HF_DATASETS_OFFLINE=1; restore the cwd and environment afterwards."""
    old_cwd, old_env = Path.cwd(), os.environ.get("HF_DATASETS_OFFLINE")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        if old_env is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = old_env


_LM_EVAL_NOTICES = (  # lm-eval's warnings about passing a model object, which is what zero_shot means to do
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in record.getMessage() for notice in _LM_EVAL_NOTICES)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval records `git describe` of the current directory (the data folder: no repository), and git prints
    "fatal: not a git repository" to the terminal; the hash is of no use here, so it is not asked for. Its two
    notices about an already-built model are dropped too; every other message stays."""
    import lm_eval.evaluator as evaluator

    logger, notices = logging.getLogger("lm_eval.models.huggingface"), _DropNotices()
    original = getattr(evaluator, "get_git_commit_hash", None)  # absent in an lm-eval without the probe
    if original is not None:
        evaluator.get_git_commit_hash = lambda: None
    logger.addFilter(notices)
    try:
        yield
    finally:
        logger.removeFilter(notices)
        if original is not None:
            evaluator.get_git_commit_hash = original


def zero_shot(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    tasks: Sequence[str] = ZERO_SHOT_TASKS,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Zero-shot accuracy on the local lm-eval tasks; returns ``{task: acc, ..., "mean": ...}``.

    Uses lm-eval's Python API with the task YAMLs in ``<data_dir>/lm_eval_tasks``; their data paths are
    relative, so evaluation runs with the data directory as the current directory (restored after).
    ``device`` moves the model there first; otherwise it is evaluated where it is.
    """
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a sequence of task names, got the string {tasks!r}; wrap it in a list.")
    if not tasks:
        raise ValueError("tasks is empty; name at least one task, e.g. ['piqa_local'].")
    root = _require_data_dir(data_dir)
    include_path = root / "lm_eval_tasks"
    if not include_path.is_dir():
        raise ValueError(f"lm-eval task folder missing: {include_path}; use a complete data folder.")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ValueError(
            f"zero-shot evaluation needs lm-eval ({e}); install it with pip install 'tp_loraprune[eval]'."
        ) from e
    if device is not None:
        model.to(device)
    with _eval_mode(model), _offline_in_dir(root), _quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=TaskManager(include_path=str(include_path)),
            limit=limit,
            log_samples=False,
            bootstrap_iters=0,
        )
    results = out["results"]
    accuracies: dict[str, float] = {}
    for task in tasks:
        metrics = results.get(task, {})
        if "acc,none" not in metrics:
            raise ValueError(
                f"lm-eval returned no 'acc,none' for task {task!r} (got {sorted(metrics)}); "
                "use tasks that report an 'acc' metric."
            )
        accuracies[task] = float(metrics["acc,none"])
    accuracies["mean"] = sum(accuracies.values()) / len(accuracies)
    return accuracies


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    ppl_datasets: Sequence[str] = ("wikitext2", "ptb"),
    seq_len: int = 512,
    max_windows: int | None = None,
    zero_shot_tasks: Sequence[str] | None = None,
    zero_shot_limit: int | float | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the paper evaluation: ``{"<name>_ppl": ..., "seq_len": ..., "zero_shot": {...}}``.

    ``"zero_shot"`` is present only when ``zero_shot_tasks`` is given. ``batch_size`` is the windows per forward
    pass (perplexity) and the lm-eval batch size; ``progress`` shows a bar per perplexity set.
    """
    report: dict[str, Any] = {}
    for name in ppl_datasets:
        text = perplexity_text(name, data_dir)
        report[f"{name}_ppl"] = perplexity(
            model, tokenizer, text, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size, progress=progress
        )
    report["seq_len"] = seq_len
    if zero_shot_tasks:
        report["zero_shot"] = zero_shot(
            model, tokenizer, tasks=zero_shot_tasks, data_dir=data_dir, limit=zero_shot_limit, batch_size=batch_size
        )
    return report
