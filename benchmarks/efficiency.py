"""Efficiency benchmark: step time and peak memory of LoRA / LoRAPrune / Taylor steps, and inference speed
of pruned, merged models. Random bf16 weights at real shapes (LLaMA-7B, LLaMA-3-8B GQA, SmolLM2-135M).

    python benchmarks/efficiency.py --skip inference --warmup 1 --steps 3 --out steps.json    # GPU: step table
    python benchmarks/efficiency.py --skip steps --out inference.json                         # GPU: inference
    python benchmarks/efficiency.py --shapes smollm2 --batch 2 --seq 128 --out /tmp/e.json  # CPU smoke

Step variants, measured side by side in one process on the same model:
  peft_lora        PEFT LoRA (r=8, all 7 projections, dropout 0), adapters in fp32 (peft's default
                   autocast_adapter_dtype=True) on a bf16 base: forward+backward+AdamW step.
  peft_lora_bf16   the same with bf16 adapters (autocast_adapter_dtype=False).
  loraprune        peft_lora_bf16 + LoRAGuidedImportance.accumulate every step + one prune event
                   amortized over prune_every=10 steps (measured separately and added).
  taylor           full weight gradients of every projection (what Taylor importance needs), no LoRA.
Times are medians over the timed steps; memory is torch.cuda.max_memory_allocated over them.
Inference: the dense model stays loaded and every pruned model is timed in turns with it (prefill of --prefill
tokens, --rounds rounds; decode of --decode tokens, --decode-rounds rounds); a row's speedup is the median over the
rounds of dense time / pruned time within a round, with its quartiles.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "tiny": dict(  # smoke tests on a CPU
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=256,
    ),
    "llama7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "llama13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
    ),
    "llama30b": dict(
        hidden_size=6656,
        intermediate_size=17920,
        num_hidden_layers=60,
        num_attention_heads=52,
        num_key_value_heads=52,
        vocab_size=32000,
    ),
    "llama65b": dict(
        hidden_size=8192,
        intermediate_size=22016,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=64,
        vocab_size=32000,
    ),
    "llama3_8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def environment(device: str, extra: tuple[str, ...] = ()) -> dict:
    """Package versions, Python and the device, recorded with every result."""
    from importlib.metadata import version

    env = {name: version(name) for name in ("torch", "transformers", "peft", *extra)}
    env["python"] = platform.python_version()
    env["device"] = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return env


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(shape: str, device: str, dtype=torch.bfloat16, *, layers: int = 0):
    """A randomly initialized LLaMA of a named shape (`layers` > 0 overrides its depth), built on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    overrides = {"num_hidden_layers": layers} if layers else {}
    config = LlamaConfig(**{**SHAPES[shape], **overrides}, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def score_and_prune(model, ids, opt, imp, step_s: float, args, *, retrace: bool) -> dict:
    """Time `accumulate` and one prune event (10% of a 20% target) on `model`, in place; with `retrace`, also a
    second event with a fresh trace + Torch-Pruning propagation (the pruner's fallback, and what every event
    cost before graphs were kept). The pruner is dropped on return, so it keeps no model alive."""
    from tp_loraprune import LoRAPruneConfig, LoRAPruner

    device = args.device
    model(input_ids=ids, labels=ids).loss.backward()  # gradients to score
    accumulate_s, _ = timed_steps(lambda: imp.accumulate(model), 1, args.steps, device)
    config = LoRAPruneConfig(ratio=0.2, total_steps=100, prune_every=10)
    pruner = LoRAPruner(model, config, optimizer=opt, importance=imp)
    sync(device)
    t = time.perf_counter()
    pruner.prune(0.1)
    sync(device)
    event = time.perf_counter() - t
    extra = {"accumulate_s": round(accumulate_s, 4), "prune_event_s": round(event, 3)}
    if retrace:
        pruner._graph = None
        t = time.perf_counter()
        pruner.prune(0.2)
        sync(device)
        extra["prune_event_retrace_s"] = round(time.perf_counter() - t, 3)
    return {**extra, "step_plus_amortized_event_s": round(step_s + event / 10, 4)}


def timed_steps(step_fn, n_warmup: int, n_timed: int, device: str) -> tuple[float, float | None]:
    for _ in range(n_warmup):
        step_fn()
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(n_timed):
        t = time.perf_counter()
        step_fn()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return statistics.median(times), peak


def paired_speedup(dense: list[float], pruned: list[float]) -> dict:
    """Median and quartiles over the rounds of dense time / pruned time within each round."""
    ratios = sorted(d / p for d, p in zip(dense, pruned, strict=True))
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"median": round(median, 3), "q1": round(q1, 3), "q3": round(q3, 3)}


def lora_model(base, bf16_adapters: bool):
    import peft

    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    return peft.get_peft_model(base, cfg, autocast_adapter_dtype=not bf16_adapters)


def lora_init_cost(shape: str, args) -> list[dict]:
    """Seconds and peak memory of wrapping the base with LoRA (tp_loraprune.train.add_lora): PEFT's default
    init vs PiSSA, which runs a randomized SVD of every projection (what lora_init="auto" costs)."""
    from tp_loraprune.train import TrainConfig, add_lora

    rows = []
    for lora_init in ("default", "pissa_niter_4"):
        base = build(shape, args.device)
        train = TrainConfig(lora_r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, lora_init=lora_init)
        sync(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated() / 2**30 if args.device.startswith("cuda") else None
        t = time.perf_counter()
        model = add_lora(base, train)
        sync(args.device)
        seconds = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
        rows.append(
            {
                "shape": shape,
                "lora_init": lora_init,
                "seconds": round(seconds, 3),
                "extra_peak_gib": None if peak is None else round(peak - held, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del model, base
        gc.collect()
        torch.cuda.empty_cache() if args.device.startswith("cuda") else None
    return rows


def step_variants(shape: str, args) -> list[dict]:
    from tp_loraprune import LoRAGuidedImportance

    device, rows = args.device, []
    for ckpt in args.checkpointing:
        base = build(shape, device)
        if ckpt:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
        ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=device)

        def train_step(model, opt, after=None):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            if after is not None:
                after()
            opt.zero_grad(set_to_none=True)

        for variant in ("peft_lora", "peft_lora_bf16", "loraprune"):
            model = lora_model(base, bf16_adapters=variant != "peft_lora")
            if ckpt:
                model.enable_input_require_grads()
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            after, extra, imp = None, {}, None
            if variant == "loraprune":
                imp = LoRAGuidedImportance(gradient="eq10")
                after = lambda: imp.accumulate(model)  # noqa: E731
            try:
                sec, peak = timed_steps(lambda: train_step(model, opt, after), args.warmup, args.steps, device)
                if variant == "loraprune":
                    extra = score_and_prune(model, ids, opt, imp, sec, args, retrace=True)
                rows.append(
                    {
                        "shape": shape,
                        "variant": variant,
                        "checkpointing": ckpt,
                        "step_s": round(sec, 4),
                        "peak_gib": None if peak is None else round(peak, 2),
                        **extra,
                    }
                )
            except torch.OutOfMemoryError:
                rows.append({"shape": shape, "variant": variant, "checkpointing": ckpt, "error": "OOM"})
            print(json.dumps(rows[-1]), flush=True)
            del opt
            base = model.unload() if hasattr(model, "unload") else base
            if variant == "loraprune":  # the pruned base is no longer the shape we measure: rebuild
                del base, model, imp, after
                gc.collect()
                torch.cuda.empty_cache() if device.startswith("cuda") else None
                base = build(shape, device)
                if ckpt:
                    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                base.config.use_cache = False
            else:
                del model
        # Taylor: full weight gradients of all projections, no LoRA (AdamW not needed for the score).
        for p in base.parameters():
            p.requires_grad_(False)
        projections = [m.weight for n, m in base.named_modules() if n.split(".")[-1] in TARGETS]
        for w in projections:
            w.requires_grad_(True)
        if ckpt:
            base.enable_input_require_grads()
        base.train()

        def taylor_step():
            base(input_ids=ids, labels=ids).loss.backward()
            for w in projections:
                w.grad = None

        try:
            sec, peak = timed_steps(taylor_step, args.warmup, args.steps, device)
            rows.append(
                {
                    "shape": shape,
                    "variant": "taylor",
                    "checkpointing": ckpt,
                    "step_s": round(sec, 4),
                    "peak_gib": None if peak is None else round(peak, 2),
                }
            )
        except torch.OutOfMemoryError:
            rows.append({"shape": shape, "variant": "taylor", "checkpointing": ckpt, "error": "OOM"})
        print(json.dumps(rows[-1]), flush=True)
        del base, projections
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def quantized_step_variants(shape: str, args) -> list[dict]:
    """LoRA and LoRAPrune steps on bitsandbytes 8-bit / 4-bit (nf4) bases: bf16 adapters, bf16 compute."""
    from tp_loraprune import LoRAGuidedImportance
    from tp_loraprune.quant import quantize_model

    device, rows = args.device, []
    for kind in args.bases:
        for ckpt in args.checkpointing:
            base = quantize_model(build(shape, device), kind, compute_dtype=torch.bfloat16)
            gc.collect()
            torch.cuda.empty_cache() if device.startswith("cuda") else None
            if ckpt:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.config.use_cache = False
            ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=device)
            model = lora_model(base, bf16_adapters=True)
            if ckpt:
                model.enable_input_require_grads()
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            imp = LoRAGuidedImportance(gradient="eq10")

            def step(score: bool):
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                if score:
                    imp.accumulate(model)
                opt.zero_grad(set_to_none=True)

            for variant, score in ((f"peft_lora_bf16_{kind}", False), (f"loraprune_{kind}", True)):
                try:
                    sec, peak = timed_steps(lambda: step(score), args.warmup, args.steps, device)
                    extra = {}
                    if score:
                        extra = score_and_prune(model, ids, opt, imp, sec, args, retrace=False)
                    row = {"step_s": round(sec, 4), "peak_gib": None if peak is None else round(peak, 2), **extra}
                except torch.OutOfMemoryError:
                    row = {"error": "OOM"}
                rows.append({"shape": shape, "variant": variant, "base": kind, "checkpointing": ckpt, **row})
                print(json.dumps(rows[-1]), flush=True)
            del model, base, opt, imp
            gc.collect()
            torch.cuda.empty_cache() if device.startswith("cuda") else None
    return rows


def write_profile(profile: cProfile.Profile, path: Path, lines: int = 45) -> None:
    """The `lines` most expensive calls of a profile, by cumulative time, as text."""
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(lines)
    path.write_text(text.getvalue())


def pruned_model(shape: str, ratio: float, allocation: str, multiple, target: str, args):
    """A model of `shape` with one LoRAPrune event at `ratio` (one backward's scores), LoRA merged; returns the
    model and what the row records about the event."""
    import peft
    from baselines import allocation_cost, keep_latency_table, shared_latency_table  # the script's folder

    from tp_loraprune import LoRAGuidedImportance, LoRAPruneConfig, LoRAPruner, merge_lora

    device = args.device
    model = build(shape, device)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=TARGETS, init_lora_weights=False))
    ids = torch.randint(0, model.config.vocab_size, (1, 64), device=device)
    imp = LoRAGuidedImportance(gradient="eq10")
    with torch.enable_grad():
        pm(input_ids=ids, labels=ids).loss.backward()
    imp.accumulate(pm)
    reused = shared_latency_table(args.latency_table, target)
    config = LoRAPruneConfig(
        ratio=ratio,
        layers=list(range(model.config.num_hidden_layers)),
        round_to=multiple,
        allocation=allocation,
        uniform=args.uniform,
        target=target,
        latency_tokens=args.prefill,
        latency_table=reused,
    )
    pruner = LoRAPruner(pm, config, importance=imp)  # under target="latency" this measures the table
    if target == "latency":
        keep_latency_table(args.latency_table, pruner.latency_table)
    profile = cProfile.Profile() if args.profile_events else None
    t0 = time.perf_counter()
    if profile:
        profile.enable()
    pruner.prune(1.0)
    sync(device)
    prune_s = time.perf_counter() - t0
    believed = allocation_cost(pruner)
    if profile:
        profile.disable()
        write_profile(profile, Path(args.out).with_suffix(f".event_{ratio}_{target}.txt"))
    event = {
        "latency_table": ("reused" if reused else "measured") if target == "latency" else None,
        "prune_event_s": round(prune_s, 3),
        "allocation_cost": believed,
    }
    return merge_lora(pm).eval(), event


def graph_decode(model, prompt: torch.Tensor, new_tokens: int):
    """A call that greedily decodes `new_tokens` after `prompt` (and returns them) with a static cache, the
    one-token forward compiled with CUDA graphs (`torch.compile(mode="reduce-overhead")`, on a GPU; eager on a
    CPU) and no `generate()` around it: the model's own decode time, with no sampling, stopping or cache
    bookkeeping per token. Its tokens equal greedy `generate()`'s."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens)
    on_gpu = prompt.device.type == "cuda"
    step = torch.compile(model.forward, mode="reduce-overhead") if on_gpu else model.forward
    start = prompt.shape[1]
    positions = torch.arange(start + new_tokens, device=prompt.device)  # on the device: no copy, no sync per token

    def run():
        cache.reset()
        logits = model(input_ids=prompt, past_key_values=cache, cache_position=positions[:start], logits_to_keep=1)
        tokens = [logits.logits.argmax(-1)]
        for i in range(start, start + new_tokens - 1):
            if on_gpu:
                torch.compiler.cudagraph_mark_step_begin()
            position = positions[i : i + 1]
            logits = step(input_ids=tokens[-1], past_key_values=cache, cache_position=position, logits_to_keep=1)
            tokens.append(logits.logits.argmax(-1))
        return torch.cat(tokens, dim=1)

    return run


def shape_of(model) -> dict:
    layers = model.model.layers
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "intermediate_sizes": sorted({layer.mlp.down_proj.in_features for layer in layers}),
        "q_heads": sorted({layer.self_attn.q_proj.out_features // model.config.head_dim for layer in layers}),
    }


@torch.no_grad()
def inference_speed(shape: str, args) -> list[dict]:
    """Prefill latency (batch 1, args.prefill tokens) and greedy decode tokens/s of dense vs pruned models, for
    every allocation in args.allocations and FFN width multiple in args.multiples. The dense model stays loaded
    and each pruned model is timed in turns with it (`baselines.times_in_turns`), so each row's speedup is the
    median over rounds of the two times of one round. Decode runs `generate()` eagerly, or with a static cache, which
    transformers compiles (`--decode-mode static`), or a bare loop in CUDA graphs (`--decode-mode graph`)."""
    from baselines import times_in_turns  # the script's folder

    device, rows = args.device, []
    static = {"cache_implementation": "static"} if args.decode_mode == "static" else {}
    if args.decode_mode != "eager":  # every pruned model is another compiled shape of one forward: keep them all
        torch._dynamo.config.recompile_limit = 64
    dense = build(shape, device).eval()
    prompt = torch.randint(0, dense.config.vocab_size, (1, args.prefill), device=device)

    def prefill(model):
        return lambda: model(input_ids=prompt, use_cache=False)

    def decode(model):
        if args.decode_mode == "graph":
            return graph_decode(model, prompt[:, :16], args.decode)
        kwargs = dict(max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False, pad_token_id=0)
        return lambda: model.generate(prompt[:, :16], **kwargs, **static)

    dense_prefill, dense_decode = prefill(dense), decode(dense) if args.decode else None
    warm = 1 if args.decode_mode == "eager" else 2
    dense_times = times_in_turns({"dense": dense_prefill}, 2, args.rounds, device)["dense"]
    row = {"shape": shape, "ratio": 0.0, "allocation": "dense", "uniform": args.uniform, "round_to": 1}
    row |= shape_of(dense) | {"target": "parameters", "prefill_s": round(statistics.median(dense_times), 4)}
    if args.decode:
        seconds = times_in_turns({"dense": dense_decode}, warm, args.decode_rounds, device)["dense"]
        row |= {
            "decode_mode": args.decode_mode,
            "decode_tokens_per_s": round(args.decode / statistics.median(seconds), 1),
        }
    rows.append(row)
    print(json.dumps(row), flush=True)
    cells = [(r, a, m, t) for r in args.ratios for a in args.allocations for m in args.multiples for t in args.targets]
    for ratio, allocation, multiple, target in cells:
        model, event = pruned_model(shape, ratio, allocation, multiple, target, args)
        t = times_in_turns({"dense": dense_prefill, "pruned": prefill(model)}, 2, args.rounds, device)
        row = {"shape": shape, "ratio": ratio, "allocation": allocation, "uniform": args.uniform}
        row |= {"round_to": multiple} | shape_of(model) | {"target": target} | event
        row |= {
            "prefill_s": round(statistics.median(t["pruned"]), 4),
            "dense_prefill_s": round(statistics.median(t["dense"]), 4),
            "prefill_speedup": paired_speedup(t["dense"], t["pruned"]),
        }
        if args.decode:
            t = times_in_turns({"dense": dense_decode, "pruned": decode(model)}, warm, args.decode_rounds, device)
            row |= {
                "decode_mode": args.decode_mode,
                "decode_tokens_per_s": round(args.decode / statistics.median(t["pruned"]), 1),
                "dense_decode_tokens_per_s": round(args.decode / statistics.median(t["dense"]), 1),
                "decode_speedup": paired_speedup(t["dense"], t["pruned"]),
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="llama7b,llama3_8b,smollm2")
    p.add_argument("--inference-shapes", default="llama7b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--checkpointing", default="1,0", help="1 = with gradient checkpointing, 0 = without")
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--decode", type=int, default=128, help="decode tokens (0: prefill only)")
    p.add_argument(
        "--decode-mode",
        choices=["eager", "static", "graph"],
        default="eager",
        help="generate() eagerly, generate() with a static cache (compiled), or a bare greedy loop with the "
        "one-token forward in CUDA graphs (graph_decode)",
    )
    p.add_argument("--rounds", type=int, default=21, help="inference: prefill rounds, dense and pruned in turns")
    p.add_argument("--decode-rounds", type=int, default=5, help="inference: decode rounds, dense and pruned in turns")
    p.add_argument("--allocations", default="auto", help="inference: comma list of LoRAPruneConfig.allocation")
    p.add_argument(
        "--multiples", default="1,64", help="inference: comma list of FFN width multiples (round_to; none: its default)"
    )
    p.add_argument("--uniform", type=int, default=1, help="inference: LoRAPruneConfig.uniform (1 or 0)")
    p.add_argument(
        "--targets", default="parameters", help="inference: comma list of LoRAPruneConfig.target (parameters,latency)"
    )
    p.add_argument(
        "--latency-table",
        default=None,
        help='inference: target="latency" cells share this table (the first measures and writes it, the rest reuse it)',
    )
    p.add_argument(
        "--profile-events", action="store_true", help="inference: write a cProfile of each prune event next to --out"
    )
    p.add_argument("--skip", default="", help="comma list: steps,inference,init")
    p.add_argument(
        "--bases", default="", help="also time LoRA/LoRAPrune steps on these bitsandbytes bases, e.g. 8bit,4bit"
    )
    p.add_argument("--base-shapes", default="llama7b", help="shapes for the --bases runs")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.checkpointing = [bool(int(c)) for c in args.checkpointing.split(",")]
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.allocations = args.allocations.split(",")
    args.multiples = [None if m == "none" else int(m) for m in args.multiples.split(",")]  # none: the default
    args.targets = args.targets.split(",")
    args.bases = [b for b in args.bases.split(",") if b]
    result = {
        "environment": environment(args.device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "steps": [],
        "inference": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(","))
    if "steps" not in skip:
        for shape in args.shapes.split(","):
            result["steps"] += step_variants(shape, args)
            out.write_text(json.dumps(result, indent=1))
    if args.bases:
        result["quantized_steps"] = []
        for shape in args.base_shapes.split(","):
            result["quantized_steps"] += quantized_step_variants(shape, args)
            out.write_text(json.dumps(result, indent=1))
    if "init" not in skip:
        result["lora_init"] = []
        for shape in args.shapes.split(","):
            result["lora_init"] += lora_init_cost(shape, args)
            out.write_text(json.dumps(result, indent=1))
    if "inference" not in skip:
        for shape in args.inference_shapes.split(","):
            result["inference"] += inference_speed(shape, args)
            out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
