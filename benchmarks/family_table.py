"""Classify every causal-LM family of the installed transformers and write the table of docs/architectures.md.

Each family (and the variants of tests/families.py's VARIANT_SETTINGS) is built tiny, wrapped with LoRA on every
linear layer and pruned twice (tests/families.py: `classify`): "exact" when the pruned model equals the dense one
masked at the removed heads and channels and survives save_pruned / load_pruned, "refused" when LoRAPruner raised a
ValueError before any weight changed. tests/test_families.py checks every committed row against a fresh run.

    python benchmarks/family_table.py            # rewrite the table in docs/architectures.md
    python benchmarks/family_table.py --check    # only report rows that differ
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from families import CannotBuild, Misclassified, classify, read_table, replace_table, table, table_row, walked_families  # noqa: E402

DOC = ROOT / "docs" / "architectures.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed table, write nothing")
    parser.add_argument("--doc", type=Path, default=DOC, help="the document holding the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows, failures, start = [], [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for family in walked_families():
            try:
                rows.append(table_row(family, classify(family, Path(tmp))))
            except (Misclassified, CannotBuild) as e:  # CannotBuild: add the family to CANNOT_BUILD with why
                failures.append(f"{family.name}: {e}")
            print(f"{family.name}: {rows[-1] if rows else ''}"[:160], file=sys.stderr)
    print(f"{len(rows)} families classified in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if failures:
        print("neither exact nor refused cleanly:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    text = args.doc.read_text()
    if args.check:
        _, committed = read_table(text)
        fresh = {r[2:].split(" | ", 1)[0]: r for r in rows}
        differ = sorted(k for k in committed.keys() | fresh.keys() if committed.get(k) != fresh.get(k))
        print("\n".join(differ) or "the committed table is current")
        return 1 if differ else 0
    args.doc.write_text(replace_table(text, table(rows)))
    print(f"wrote {len(rows)} rows to {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
