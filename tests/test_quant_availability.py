"""A quantized base asked for where bitsandbytes cannot serve it: not installed, failing to import on this platform,
too old, or without a backend for the device. Each is one ImportError line with the fix, raised before any weight
changes (library) or before the model loads (CLI); these tests run with and without bitsandbytes installed."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from conftest import build_llama, save_tiny_hf
from test_cli import _refused, no_model  # noqa: F401  (fixture)

from tp_loraprune import load_model_and_tokenizer, quantize_model
from tp_loraprune.quant import bnb_config, has_quantized_layers, require_bitsandbytes

NOT_INSTALLED = (
    "quantize='4bit' (a bitsandbytes 4bit base) needs bitsandbytes, which is not installed: pip install "
    "'tp_loraprune[quant]'."
)


@pytest.fixture
def without_bitsandbytes(monkeypatch):
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError


class _BrokenBuild:
    """A finder whose bitsandbytes raises while loading its native library, as a build for another platform does."""

    def find_spec(self, name, path=None, target=None):
        if name == "bitsandbytes":
            raise OSError("libbitsandbytes_cuda130.so: cannot open shared object file: No such file or directory")
        return None


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_not_installed_is_one_line_with_the_extra_to_install(tmp_path, without_bitsandbytes):
    with pytest.raises(ImportError) as info:
        load_model_and_tokenizer(save_tiny_hf(tmp_path / "m"), quantize="4bit")
    assert _one_line(info) == NOT_INSTALLED
    with pytest.raises(ImportError, match="needs bitsandbytes, which is not installed"):
        bnb_config("8bit")
    model = build_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ImportError, match="quantize='8bit' .* needs bitsandbytes, which is not installed"):
        quantize_model(model, "8bit")
    assert not has_quantized_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_cli_quantize_without_bitsandbytes_is_refused_before_the_model_loads(tmp_path, no_model, without_bitsandbytes):  # noqa: F811
    message = _refused(["prune", "--out", str(tmp_path / "out"), "--quantize", "4bit"])
    assert message == f"error: {NOT_INSTALLED}"


def test_a_build_that_fails_to_import_here_says_so_and_how_to_reinstall(monkeypatch):
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BrokenBuild(), *sys.meta_path])
    with pytest.raises(ImportError) as info:
        require_bitsandbytes("8bit", "cpu")
    message = _one_line(info)
    assert "bitsandbytes is installed but fails to import here (OSError: libbitsandbytes_cuda130.so" in message
    assert "pip install --force-reinstall 'bitsandbytes>=0.50'" in message


bnb_installed = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")


@bnb_installed
def test_an_old_bitsandbytes_is_refused_with_the_upgrade(monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "__version__", "0.42.0")
    with pytest.raises(ImportError) as info:
        quantize_model(build_llama(), "4bit")
    assert "needs bitsandbytes >= 0.50 (installed: 0.42.0" in _one_line(info)
    assert "pip install -U 'bitsandbytes>=0.50'" in str(info.value)


@bnb_installed
def test_a_device_bitsandbytes_has_no_backend_for_is_refused(monkeypatch, tmp_path):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda", "xpu"})
    with pytest.raises(ImportError) as info:
        load_model_and_tokenizer(save_tiny_hf(tmp_path / "m"), quantize="8bit", device="cpu")
    assert "has no backend for 'cpu' devices (it supports cuda, xpu)" in _one_line(info)


@bnb_installed
def test_loading_quantized_without_accelerate_names_it(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="transformers' bitsandbytes loader, which needs accelerate"):
        bnb_config("4bit")
    assert require_bitsandbytes("4bit", "cpu") is not None  # quantize_model's path needs no accelerate
