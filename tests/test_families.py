"""Every causal-LM family of the installed transformers is either exact or refused clearly.

The walk (tests/families.py) builds each family of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` tiny from its default config
(and a few variants that change how heads are laid out or normalised), puts LoRA on every linear layer, perturbs
every norm weight and bias, runs a backward pass and prunes half the heads and FFN channels of every layer in two
events. A family must then be exactly one of:

* exact: the pruned logits equal the dense model's with the removed heads' output-projection columns and the removed
  channels' down-projection columns zeroed (fp32 tolerance), and save_pruned / load_pruned gives the same logits;
* refused: a ValueError before any weight changed (checked bit for bit) that names a class and a module of the model.

A crash, a wrong result or a refusal after a change fails. Families that cannot be built tiny on a CPU are skipped
with their recorded reason. docs/architectures.md's table is generated from this walk (benchmarks/family_table.py);
each row is checked against it when the installed transformers is the one the table was made with.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from families import CannotBuild, classify, read_table, table_row, walked_families

DOC = Path(__file__).resolve().parent.parent / "docs" / "architectures.md"
FAMILIES = walked_families()


def _committed() -> tuple[str, dict[str, str]]:
    return read_table(DOC.read_text())


def _table_is_for_this_transformers() -> bool:
    import transformers

    return _committed()[0] == transformers.__version__


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_family_is_exact_or_refused_clearly(family, tmp_path):
    try:
        outcome = classify(family, tmp_path)  # raises Misclassified for anything else
    except CannotBuild as e:
        if _table_is_for_this_transformers():  # the committed table says this family builds
            raise
        pytest.skip(f"cannot be built tiny on this transformers: {e}")
    if _table_is_for_this_transformers():
        row = _committed()[1].get(family.name)
        assert row == table_row(family, outcome), "regenerate it: python benchmarks/family_table.py"
    if outcome.kind == "skipped":
        pytest.skip(f"{family.name} cannot be built tiny: {outcome.detail}")
    assert outcome.kind in ("exact", "refused")


def test_table_lists_exactly_the_installed_families():
    import transformers

    version, rows = _committed()
    if version != transformers.__version__:
        pytest.skip(
            f"docs/architectures.md's table was made with transformers {version}, not {transformers.__version__}"
        )
    assert sorted(rows) == sorted(f.name for f in FAMILIES), "regenerate it: python benchmarks/family_table.py"
