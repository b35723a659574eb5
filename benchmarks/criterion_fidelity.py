"""How closely each LoRA-guided score variant ranks FFN channels like first-order Taylor with true weight
gradients, on the real SmolLM2-135M: a cheap, CPU-sized measurement behind the default score variant.

For K LoRA steps on C4 blocks, the four variants (square / abs, with and without per-module
normalization) accumulate side by side from the same gradients, while the full weight gradients of the
same batches are summed for Taylor |W ∘ ∂L/∂W|. Per pruned layer, the Spearman rank correlation of the
channel scores and the overlap of the bottom 20% (the channels a 20% prune removes) are reported.

    python benchmarks/criterion_fidelity.py --out benchmarks/results/criterion_fidelity_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import _BaseWeightsOnly, cpu_environment, lora_steps_with_weight_gradients, write_result  # noqa: E402

from tp_loraprune import LoRAGuidedImportance, LoRAPruneConfig, LoRAPruner  # noqa: E402
from tp_loraprune.data import read_text_documents, token_blocks  # noqa: E402
from tp_loraprune.eval import find_data_dir  # noqa: E402
from tp_loraprune.graph import build_graph  # noqa: E402
from tp_loraprune.loading import load_model_and_tokenizer  # noqa: E402
from tp_loraprune.train import TrainConfig, prepare_lora_model  # noqa: E402

VARIANTS = {
    "square": ("square", False),
    "square+norm": ("square", True),
    "abs": ("abs", False),
    "abs+norm": ("abs", True),
}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def bottom_overlap(a: torch.Tensor, b: torch.Tensor, frac: float = 0.2) -> float:
    k = max(1, int(len(a) * frac))
    return len(set(a.argsort()[:k].tolist()) & set(b.argsort()[:k].tolist())) / k


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-init", default="default", help="TrainConfig.lora_init (the published run: default)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer()
    data_dir = find_data_dir()
    docs = read_text_documents(os.path.join(data_dir, "calibration", "c4_demo.jsonl")) if data_dir else "builtin"
    blocks = token_blocks(
        docs if isinstance(docs, list) else read_text_documents(docs), tok, block_size=args.block_size
    )
    train = TrainConfig(lr=args.lr, lora_dropout=0.0, lora_init=args.lora_init, progress=False)
    peft_model = prepare_lora_model(model, train)
    imps = {name: LoRAGuidedImportance(score=s, normalize=n, gradient="eq10") for name, (s, n) in VARIANTS.items()}
    pruner = LoRAPruner(peft_model, LoRAPruneConfig(ratio=0.2), importance=imps["square"])
    lora_steps_with_weight_gradients(
        peft_model, blocks, args.steps, args.batch_size, args.lr, imps.values(), tok.vocab_size
    )
    taylor = _BaseWeightsOnly(__import__("torch_pruning").importance.GroupTaylorImportance(), peft_model)
    graph = build_graph(peft_model)
    rows = {name: {"spearman": [], "bottom20_overlap": []} for name in imps}
    with torch.no_grad():
        for group in pruner._channel_groups(graph).values():
            t = taylor(group).float().cpu()
            for name, imp in imps.items():
                s = imp(group).float().cpu()
                rows[name]["spearman"].append(spearman(s, t))
                rows[name]["bottom20_overlap"].append(bottom_overlap(s, t))
    summary = {name: {k: round(statistics.median(v), 4) for k, v in r.items()} for name, r in rows.items()}
    result = {
        "what": "median over the 26 pruned layers' FFN groups, vs Taylor |W*dL/dW| on the same batches",
        "settings": vars(args),
        "summary": summary,
        "per_layer": rows,
        "environment": cpu_environment(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_result(args.out, result, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
