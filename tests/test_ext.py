"""The compiled extension: loaded once, and a failure kept and reported, never raised."""

import importlib
import os

import pytest
import torch

from moss_kernels import _ext, backends


@pytest.mark.skipif(os.environ.get("MOSS_BUILD_EXT") == "0", reason="installed without _C")
def test_extension_is_built_for_the_running_torch():
    assert _ext.load_error() is None, _ext.load_error()
    info = _ext.build_info()
    assert info["torch"] == torch.__version__.split("+")[0]
    assert info["path"].endswith(".so") and info["compiler"]
    assert {"openmp", "cuda", "debug"} <= set(info)


def test_a_failed_load_is_reported(monkeypatch):
    real_import = importlib.import_module

    def broken(name, *args):
        if name == "moss_kernels._C":
            raise ImportError("undefined symbol: _ZN2at4_ops3foo")
        return real_import(name, *args)

    monkeypatch.setattr(_ext, "_state", {})
    monkeypatch.setattr(backends, "_cache", {})
    monkeypatch.setattr(importlib, "import_module", broken)
    assert not _ext.loaded()
    assert "undefined symbol" in _ext.load_error()
    if os.environ.get("MOSS_BUILD_EXT") != "0":  # read from the file that failed to load
        assert _ext.build_info()["torch"] == torch.__version__.split("+")[0]
        assert _ext.build_info()["cuda"] in ("no", torch.version.cuda)
    assert "moss_kernels._C is not usable: ImportError: undefined symbol" in \
        backends.backend("cpu").unavailable
    assert backends.resolve(None, "cpu") == "reference"  # the package still works


def test_a_missing_build_says_how_to_build(monkeypatch):
    real_import = importlib.import_module

    def missing(name, *args):
        if name == "moss_kernels._C":
            raise ModuleNotFoundError("No module named 'moss_kernels._C'", name=name)
        return real_import(name, *args)

    monkeypatch.setattr(_ext, "_state", {})
    monkeypatch.setattr(importlib, "import_module", missing)
    assert "MOSS_BUILD_EXT=0" in _ext.load_error()
    assert "pip install --no-build-isolation -e ." in _ext.load_error()


def test_a_stale_build_is_reported(monkeypatch):
    monkeypatch.setattr(_ext, "_state", {})
    monkeypatch.setattr(torch, "__version__", "9.99.0")
    if _ext._load()["info"] is None:
        pytest.skip("extension not built")
    assert "built against torch" in _ext.load_error() and "9.99.0" in _ext.load_error()
    assert not _ext.loaded()
