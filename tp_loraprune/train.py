"""The one-call driver: LoRA fine-tune with LoRAPrune inside, for scripts, the CLI and benchmarks.

    result = tp_loraprune.prune(model, tokenizer, documents, LoRAPruneConfig(ratio=0.2), TrainConfig())
    result.model   # merged, pruned, plain transformers model

Each optimizer step: `grad_accum` micro-batches (forward/backward under autocast) → unscale (fp16) →
clip → optimizer step → scheduler step → `pruner.step()` (scores, maybe a prune event) → zero_grad.
Data order and dropout are seeded per step, so a resumed run repeats an uninterrupted one.

Launched with `torchrun` / `accelerate launch` (WORLD_SIZE > 1), the same call trains data-parallel:
each rank runs its rank-strided rows of every micro-batch (the global batch is `batch_size`, as in one
process) through DistributedDataParallel, all ranks prune the same structures in lockstep, and only
rank 0 shows progress and writes checkpoints. See `distributed.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .config import LoRAPruneConfig
from .integrity import NonFiniteError, check_finite, check_writable
from .latency_table import LatencyTable
from .lora import lora_layers
from .models import count_parameters
from .moe import EXPERT_PARAMETERS, moe_layouts
from .pruner import LoRAPruner
from .quant import has_quantized_layers

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """The LoRA fine-tune that pruning runs inside (the paper: r=8, α=16, AdamW; lr 1e-4 there).

    `lr` 4e-4: the best peak of a sweep (1e-4 / 2e-4 / 4e-4 / 1e-3) on SmolLM2-135M at 20% and 30% for
    WikiText-2, PTB and zero-shot, 100 steps of 8 × 256 tokens (docs/benchmarks.md); 50% preferred 1e-3.

    `lora_init` says how A and B start: "auto" (PiSSA on float bases, PEFT's default on bitsandbytes
    bases), "default" (PEFT's: B = 0), "gaussian", "pissa", "pissa_niter_<n>" or "olora"; see `add_lora`.

    `lr_schedule` shapes the learning rate after the `warmup_ratio` warmup: "linear" decays it to zero over the
    whole run; "wsd" (warmup-stable-decay) holds it until the last `decay_ratio` of the steps and decays it
    there, so removals late in the pruning ramp still recover at the full rate (see `lr_factor`).
    """

    lr: float = 4e-4
    batch_size: int = 4
    grad_accum: int = 1
    block_size: int = 256
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_init: str = "auto"
    warmup_ratio: float = 0.03
    lr_schedule: str = "linear"
    decay_ratio: float = 0.1
    target_modules: str | list[str] = "all-linear"
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 0
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in _DTYPES:
            raise ValueError(f"`precision` must be one of {list(_DTYPES)}, got {self.precision!r}.")
        for name in ("batch_size", "grad_accum", "block_size", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if not _is_lora_init(self.lora_init):
            raise ValueError(
                f"`lora_init` must be 'auto' (PiSSA on float bases, else PEFT's default), 'default' (PEFT's B = 0), "
                f"'gaussian', 'pissa', 'pissa_niter_<n>' or 'olora', got {self.lora_init!r}."
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"`lr` must be a finite number > 0, got {self.lr}; e.g. 1e-4 (CLI --lr).")
        if self.checkpoint_every < 0:
            raise ValueError(f"`checkpoint_every` must be >= 0 (0 = never), got {self.checkpoint_every}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(
                f"`warmup_ratio` is the fraction of the steps the learning rate warms up over, in [0, 1); got "
                f"{self.warmup_ratio} (CLI --warmup-ratio)."
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"`lr_schedule` must be one of {LR_SCHEDULES}, got {self.lr_schedule!r} (CLI --lr-schedule)."
            )
        most, bound = 1.0, "1"
        if self.lr_schedule == "wsd":  # its decay follows the warmup
            most, bound = 1.0 - self.warmup_ratio, f"1 - warmup_ratio = {1.0 - self.warmup_ratio:g}"
        if not 0.0 < self.decay_ratio <= most:
            raise ValueError(
                f"`decay_ratio` is the fraction of the steps the learning rate decays over under lr_schedule='wsd', "
                f"in (0, {bound}]; got {self.decay_ratio} (CLI --decay-ratio)."
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout} (CLI --lora-dropout).")


@dataclass
class PruneResult:
    model: nn.Module  # merged LoRA, pruned, plain transformers model
    events: list[dict]
    summary: dict
    seconds: float
    losses: list[float]
    latency_table: LatencyTable | None = None  # what target="latency" allocated by (`.save(path)` to reuse it)


LR_SCHEDULES = ("linear", "wsd")
AUTO_LORA_INIT = "pissa_niter_4"  # what lora_init="auto" means on a float base (docs/benchmarks.md: PiSSA)


def _is_lora_init(value: object) -> bool:
    if value in ("auto", "default", "gaussian", "pissa", "olora"):
        return True
    niter = value.removeprefix("pissa_niter_") if isinstance(value, str) else ""
    return niter.isdigit() and int(niter) > 0


def _rewrites_base(lora_init: str) -> bool:
    """PiSSA and OLoRA start A and B from the weight and leave the residual W − s·B·A in the base layer."""
    return lora_init.startswith("pissa") or lora_init == "olora"


def add_lora(model: nn.Module, train: TrainConfig) -> nn.Module:
    """Wrap a plain model with a fresh PEFT LoRA adapter (a PEFT model is returned unchanged).

    `train.lora_init` is PEFT's `init_lora_weights`. With "pissa" / "pissa_niter_<n>" (or "olora") A and B
    start from the top-r singular vectors of each weight (QR for OLoRA), the base keeps the residual
    W − s·BA, and the model's output is unchanged. B is then not zero at the start, so both terms of the
    LoRA-guided gradient carry information from the first step; with PEFT's default (B = 0) the scores of
    input channels (o_proj, down_proj columns) follow the random A and the weights' magnitude until B has
    grown (docs/benchmarks.md). "auto" is PiSSA on float bases and PEFT's default on bitsandbytes bases,
    whose weights cannot hold a residual.

    Mixture-of-experts models also get LoRA on their routed experts' 3-D parameters (`target_parameters`), which
    needs `lora_dropout=0`; "auto" is PEFT's default init there (PiSSA cannot decompose a stack of experts).
    """
    if lora_layers(model):
        return model
    import peft

    quantized = has_quantized_layers(model)
    experts = bool(moe_layouts(model))  # LoRA on the experts' 3-D parameters: PEFT's ParamWrapper
    lora_init = train.lora_init
    if experts:
        _check_expert_lora(train)
    if lora_init == "auto":
        lora_init = "default" if quantized or experts else AUTO_LORA_INIT
    if quantized and _rewrites_base(lora_init):
        raise ValueError(
            f"`lora_init={lora_init!r}` rewrites the base weights to a residual, which a bitsandbytes base cannot "
            "hold; use lora_init='auto' or 'default' with quantized bases."
        )
    config = peft.LoraConfig(
        r=train.lora_r,
        lora_alpha=train.lora_alpha,
        lora_dropout=train.lora_dropout,
        target_modules=train.target_modules,
        init_lora_weights=True if lora_init == "default" else cast(Any, lora_init),  # checked in TrainConfig
        task_type="CAUSAL_LM",
        **cast(dict[str, Any], {"target_parameters": list(EXPERT_PARAMETERS)} if experts else {}),
    )
    with warnings.catch_warnings():  # PEFT reads the attribute transformers 5 deprecated; not the user's business
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(model, config)


def _check_expert_lora(train: TrainConfig) -> None:
    """PEFT's ParamWrapper, which puts LoRA on 3-D expert parameters, takes neither dropout nor an init that reads
    `base_layer.weight` (PiSSA, OLoRA: an experts module has no `weight`)."""
    if train.lora_dropout:
        raise ValueError(
            f"`lora_dropout={train.lora_dropout}` cannot be used on a mixture-of-experts model: PEFT's ParamWrapper "
            "(LoRA on the experts' 3-D parameters) supports no dropout. Pass lora_dropout=0 (CLI --lora-dropout 0)."
        )
    if _rewrites_base(train.lora_init):
        raise ValueError(
            f"`lora_init={train.lora_init!r}` cannot initialise LoRA on the experts of a mixture-of-experts model "
            "(PEFT's ParamWrapper has no base weight to decompose); use lora_init='auto' or 'default'."
        )


def _batch(blocks: torch.Tensor, step: int, micro: int, train: TrainConfig) -> torch.Tensor:
    """The micro-batch of a step, drawn from a permutation seeded by (seed, epoch): resumable, no RNG state."""
    per_step = train.batch_size * train.grad_accum
    start = step * per_step + micro * train.batch_size
    epoch, offset = divmod(start, len(blocks))
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(train.seed * 100_003 + epoch))
    idx = order[(torch.arange(train.batch_size) + offset) % len(blocks)]
    return blocks[idx]


def prepare_lora_model(model: nn.Module, train: TrainConfig) -> nn.Module:
    """Seeded LoRA wrapping, device placement, gradient checkpointing, train mode."""
    torch.manual_seed(train.seed)
    if has_quantized_layers(model):  # bitsandbytes layers stay where they were loaded (device_map)
        _check_quantized_device(model, train.device)
        model = add_lora(model, train)
    else:
        model = add_lora(model, train).to(train.device)
    if train.gradient_checkpointing:
        _enable_checkpointing(model)
        cast(Any, model).enable_input_require_grads()
    return model.train()


def _enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing under the name this transformers has (5.24 renamed it and warns on the old one)."""
    base: Any = cast(Any, model).get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _check_quantized_device(model: nn.Module, device: str) -> None:
    expected, where = torch.device(device), {p.device for p in model.parameters()}
    if any(d.type != expected.type or expected.index not in (None, d.index) for d in where):
        raise ValueError(
            f"The quantized model is on {sorted(map(str, where))} but train.device is {device!r}; bitsandbytes "
            f"layers cannot be moved after loading. Load it with device_map={device!r} (e.g. "
            f"`load_model_and_tokenizer(..., quantize='8bit', device={device!r})`)."
        )


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "linear", decay_steps: int = 0) -> float:
    """The learning rate at optimizer step `step` as a fraction of the peak (with a floor of 1e-3).

    A linear warmup over `warmup_steps`, then "linear": a linear decay to zero at `total_steps`; "wsd": the
    peak until the last `decay_steps`, a linear decay to zero over those."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    if schedule == "linear":
        decay = 1.0 - step / total_steps
    else:
        decay = (total_steps - step) / max(1, decay_steps)
    return warm * min(1.0, max(0.0, decay)) + 1e-3


def make_optimizer(model: nn.Module, train: TrainConfig, total_steps: int):
    """AdamW on the trainable (LoRA) parameters; the learning rate follows `lr_factor` (`train.lr_schedule`)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.lr, weight_decay=0.0)
    warmup = max(1, int(train.warmup_ratio * total_steps))
    decay = max(1, round(train.decay_ratio * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, train.lr_schedule, decay)
    )
    return optimizer, scheduler


def build_training(model: nn.Module, config: LoRAPruneConfig, train: TrainConfig):
    """(peft_model, optimizer, scheduler, pruner) for a run; also what a resume rebuilds."""
    model = prepare_lora_model(model, train)
    optimizer, scheduler = make_optimizer(model, train, config.total_steps)
    agree = distributed.agree_on_removals if distributed.is_distributed() else None
    return model, optimizer, scheduler, LoRAPruner(model, config, optimizer=optimizer, agree=agree)


def finetune(
    peft_model: nn.Module,
    blocks: torch.Tensor,
    train: TrainConfig,
    total_steps: int,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    pruner: LoRAPruner | None = None,
    start_step: int = 0,
    stop_after: int | None = None,
    checkpoint_dir: str | Path | None = None,
    losses: list[float] | None = None,
    on_event: Callable[[dict], None] | None = None,
    fingerprint: dict | None = None,
) -> list[float]:
    """The LoRA training loop; with a `pruner`, `pruner.step()` runs after every optimizer step.

    The loss, the gradient norm and the trainable weights are checked after every step: a non-finite
    one raises NonFiniteError (under fp16 a non-finite gradient is the GradScaler's business: the step
    is skipped and the step's gradients count as zero in the scores). With `checkpoint_dir` and
    `train.checkpoint_every`, a checkpoint is written every that many steps and after the last one.

    In a process group of several ranks the forward/backward runs through DistributedDataParallel on
    this rank's rows of each micro-batch, rebuilt after every prune event; the logged loss is the mean
    over ranks.
    """
    from .checkpoint import save_checkpoint

    losses = [] if losses is None else losses
    dtype = _DTYPES[train.precision]
    device_type = torch.device(train.device).type
    autocast = dtype != torch.float32
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    rank, world = distributed.rank(), distributed.world_size()
    forward = distributed.wrap_ddp(peft_model) if world > 1 else peft_model
    bar = _progress_bar(total_steps, start_step, train.progress and rank == 0)
    for step in range(start_step, total_steps):
        if stop_after is not None and step >= stop_after:
            break
        torch.manual_seed(train.seed * 1_000_003 + step + 7_919 * rank)  # dropout masks repeat on resume
        total = 0.0
        for micro in range(train.grad_accum):
            ids = distributed.local_rows(_batch(blocks, step, micro, train), rank, world).to(train.device)
            last = micro == train.grad_accum - 1
            with _no_sync(forward, last):
                with torch.autocast(device_type, dtype=dtype, enabled=autocast):
                    loss = forward(input_ids=ids, labels=ids, use_cache=False).loss / train.grad_accum
                scaler.scale(loss).backward()
            total += loss.item()
        total = distributed.mean_over_ranks(total)
        if not math.isfinite(total):
            raise NonFiniteError(
                f"The loss became {total} at step {step}; nothing of this step was saved. {_NON_FINITE_FIX}"
            )
        scaler.unscale_(optimizer)  # scores and clipping see true gradients, not loss-scaled ones
        max_norm = train.max_grad_norm if train.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
        if not math.isfinite(grad_norm):
            if not scaler.is_enabled():
                raise NonFiniteError(
                    f"The gradient norm became {grad_norm} at step {step}; nothing of this step was saved. "
                    f"{_NON_FINITE_FIX}"
                )
            for p in trainable:  # fp16 overflow: the scaler skips this step; keep the scores finite
                if p.grad is not None:
                    p.grad.zero_()
        scaler.step(optimizer)
        scaler.update()
        weights_max = float(torch.nn.utils.get_total_norm(trainable, norm_type=math.inf))
        if not math.isfinite(weights_max):
            raise NonFiniteError(
                f"The LoRA weights became non-finite in the optimizer step of step {step} (loss {total:.4g}, "
                f"gradient norm {grad_norm:.4g}); nothing of this step was saved. {_NON_FINITE_FIX}"
            )
        if scheduler is not None:
            scheduler.step()
        event = pruner.step() if pruner is not None else None
        if event is not None:
            trainable = [p for p in peft_model.parameters() if p.requires_grad]
            if world > 1:
                forward = distributed.rewrap_ddp(cast(Any, forward))
            if on_event is not None:
                on_event(event)
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        if bar is not None:
            bar.set_postfix(loss=f"{total:.3f}", params=f"{count_parameters(peft_model) / 1e6:.2f}M")
            bar.update(1)
        due = (step + 1) % train.checkpoint_every == 0 or step + 1 == total_steps if train.checkpoint_every else False
        if checkpoint_dir is not None and pruner is not None and due:
            if rank == 0:
                save_checkpoint(
                    checkpoint_dir,
                    peft_model,
                    optimizer,
                    pruner,
                    scheduler,
                    {"losses": losses},
                    fingerprint=fingerprint,
                )
            distributed.barrier()  # no rank runs ahead of a checkpoint that is still being written
    if bar is not None:
        bar.close()
    return losses


def prune(
    model: nn.Module,
    tokenizer,
    data,
    config: LoRAPruneConfig | None = None,
    train: TrainConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_event: Callable[[dict], None] | None = None,
    stop_after: int | None = None,
    dequantize: bool = True,
) -> PruneResult:
    """LoRA fine-tune `model` on `data` for `config.total_steps` steps while pruning.

    `data` is a (n, block_size) tensor of token ids, a list of documents, or a source for
    `tp_loraprune.data.read_text_documents` (a text/jsonl file, "builtin", a dataset name).
    Returns the merged, pruned model. With `checkpoint_dir` and `train.checkpoint_every`, a checkpoint
    is written every that many steps and after the last step; `resume=True` continues from it (a resumed
    run repeats an uninterrupted one). A checkpoint carries a fingerprint of the base model, the data and
    the settings (`run_fingerprint`); resuming with anything else is refused. `stop_after` ends the loop early
    (after that many steps, without merging) to simulate an interruption. A quantized (bitsandbytes) base
    is merged into a dequantized float model unless `dequantize=False` (see `export.merge_lora`).
    """
    from .checkpoint import load_checkpoint
    from .export import merge_lora

    config, train = config or LoRAPruneConfig(), train or TrainConfig()
    device = distributed.init_from_env(train.device)
    if device != train.device:
        train = replace(train, device=device)
    world = distributed.world_size()
    if train.batch_size % world:
        raise ValueError(
            f"`batch_size` ({train.batch_size}) is the global batch, split over {world} processes, so it must be a "
            f"multiple of {world}; use e.g. batch_size={world * max(1, train.batch_size // world)}."
        )
    blocks = _as_blocks(data, tokenizer, train.block_size)
    if blocks.dim() != 2 or len(blocks) == 0:
        raise ValueError(
            f"`blocks` must be a non-empty (n, block_size) tensor of token ids, got shape {tuple(blocks.shape)}."
        )
    if resume and (checkpoint_dir is None or not Path(checkpoint_dir).exists()):
        raise ValueError(f"resume=True needs an existing checkpoint_dir, got {checkpoint_dir}.")
    if checkpoint_dir is not None and train.checkpoint_every and distributed.rank() == 0:
        check_writable(checkpoint_dir, option="checkpoint_dir")
    fingerprint = run_fingerprint(model, blocks, config, train) if checkpoint_dir is not None else None
    peft_model, optimizer, scheduler, pruner = build_training(model, config, train)
    losses: list[float] = []
    if resume and checkpoint_dir is not None:  # checked above
        extra = load_checkpoint(checkpoint_dir, peft_model, optimizer, pruner, scheduler, fingerprint=fingerprint)
        losses = list(extra.get("losses", []))
    t0 = time.perf_counter()
    losses = finetune(
        peft_model,
        blocks,
        train,
        config.total_steps,
        optimizer=optimizer,
        scheduler=scheduler,
        pruner=pruner,
        start_step=pruner.step_count,
        stop_after=stop_after,
        checkpoint_dir=checkpoint_dir,
        losses=losses,
        on_event=on_event,
        fingerprint=fingerprint,
    )
    seconds = time.perf_counter() - t0
    summary = pruner.summary()
    if stop_after is not None and pruner.step_count < config.total_steps:
        return PruneResult(peft_model, pruner.events, summary, seconds, losses, pruner.latency_table)
    if pruner.progress < 1.0:
        pruner.prune(1.0)
    merged = merge_lora(peft_model, dequantize=dequantize).eval()
    check_finite(
        merged.state_dict().items(),
        what="The merged model",
        fix=_NON_FINITE_FIX,
    )
    summary = dict(pruner.summary(), parameters=count_parameters(merged))
    return PruneResult(merged, pruner.events, summary, seconds, losses, pruner.latency_table)


_NON_FINITE_FIX = (
    "Fine-tune again with a lower `lr` (CLI --lr) or `max_grad_norm`, or in fp32/bf16 instead of fp16 (a checkpoint "
    "resumes only with the settings it was written with, so this is a new run)."
)
_UNFINGERPRINTED = ("device", "progress", "checkpoint_every", "extra")  # may change between a run and its resume


def run_fingerprint(model: nn.Module, blocks: torch.Tensor, config: LoRAPruneConfig, train: TrainConfig) -> dict:
    """What a checkpoint must match to be resumed: the base model's weights, the data and the settings.

    The model part hashes every parameter's name, shape, dtype and up to 4096 evenly spaced values
    (fast at any size; another model of the same shape differs there). The data part hashes every token.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            idx = torch.linspace(0, max(flat.numel() - 1, 0), min(flat.numel(), 4096), device=flat.device).long()
            digest.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            digest.update(flat[idx].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    data = hashlib.sha256(blocks.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    settings = {k: v for k, v in asdict(train).items() if k not in _UNFINGERPRINTED}
    return {
        "model": digest.hexdigest()[:16],
        "data": f"{data[:16]} ({tuple(blocks.shape)[0]} blocks of {tuple(blocks.shape)[-1]} tokens)",
        "config": config.to_dict(),
        "train": settings,
    }


def _no_sync(forward: nn.Module, last_micro_batch: bool):
    """DDP's no_sync for all but the last micro-batch of a step: one all-reduce per optimizer step."""
    if last_micro_batch or not isinstance(forward, DistributedDataParallel):
        return contextlib.nullcontext()
    return forward.no_sync()


def _as_blocks(data, tokenizer, block_size: int) -> torch.Tensor:
    if torch.is_tensor(data):
        return data
    from .data import read_text_documents, token_blocks

    if tokenizer is None:
        raise ValueError("Text data needs a tokenizer: pass `tokenizer`, or pass a tensor of token blocks.")
    documents = data if isinstance(data, list) else read_text_documents(data)
    return token_blocks(documents, tokenizer, block_size=block_size)


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="LoRAPrune", unit="step")


def log_json(result: PruneResult, config: LoRAPruneConfig, train: TrainConfig) -> str:
    """Every prune event (step, what was removed per structure, params left) plus settings, as JSON."""
    return json.dumps(
        {
            "config": config.to_dict(),
            "train": asdict(train),
            "summary": result.summary,
            "seconds": result.seconds,
            "losses": result.losses,
            "events": result.events,
        },
        indent=1,
    )


def write_log(path: str | Path, result: PruneResult, config: LoRAPruneConfig, train: TrainConfig) -> None:
    """`log_json` written to `path`."""
    Path(path).write_text(log_json(result, config, train))
