"""Packaging promises: `import tp_loraprune` is cheap, the version comes from metadata, and the public
names resolve lazily."""

import re
import subprocess
import sys
from pathlib import Path

import pytest


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


def test_license_metadata_is_the_spdx_form_setuptools_reads_without_a_deprecation_warning():
    """PEP 639: an SPDX `license` string and `license-files` (a TOML table is deprecated and warns at install);
    setuptools reads them from 77 on, so that is the build floor."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[1]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    project = pyproject["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in (root / "LICENSE").read_text() and "Version 2.0" in (root / "LICENSE").read_text()
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]
    (setuptools,) = [r for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    floor = tuple(int(x) for x in re.fullmatch(r"setuptools>=(\d+)(?:\.(\d+))?.*", setuptools).groups(default="0"))
    assert floor >= (77, 0), setuptools
