"""Packaging promises: `import tp_loraprune` is cheap, the version comes from metadata, and the public
names resolve lazily."""

import subprocess
import sys


def test_import_is_lean():
    code = (
        "import sys, tp_loraprune; "
        "heavy = [m for m in ('lm_eval', 'datasets', 'bitsandbytes', 'peft', 'transformers', 'torch_pruning') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version_and_lazy_exports():
    import tp_loraprune

    assert tp_loraprune.__version__ != "0.0.0"
    for name in tp_loraprune.__all__:
        assert getattr(tp_loraprune, name) is not None
