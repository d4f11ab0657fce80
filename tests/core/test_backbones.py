"""pacl_ray.core.backbones.autocast: the one mixed-precision helper of every stage."""

from __future__ import annotations

import contextlib
import pathlib

import pytest
import torch

from pacl_ray.core.backbones import autocast, autocast_dtype


def test_precision_names_map_to_dtypes_on_cuda_and_float32_on_cpu():
    assert autocast_dtype("bf16", "cuda") is torch.bfloat16
    assert autocast_dtype("fp16", torch.device("cuda:0")) is torch.float16
    assert autocast_dtype("fp32", "cuda") is None
    assert autocast_dtype("bf16", "cpu") is None  # CPU always runs float32
    with pytest.raises(ValueError, match="precision 'bf61': expected one of bf16, fp16, fp32"):
        autocast_dtype("bf61", "cpu")


def test_cpu_and_fp32_are_no_ops():
    assert isinstance(autocast("cpu", "bf16"), contextlib.nullcontext)
    assert isinstance(autocast(torch.device("cuda"), "fp32"), contextlib.nullcontext)
    a = torch.randn(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_autocast_runs_matmuls_in_the_named_dtype():
    a = torch.randn(4, 4, device="cuda")
    with autocast(a.device, "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast("cuda", "fp16"):
        assert (a @ a).dtype == torch.float16


def test_no_module_calls_torch_autocast_itself():
    root = pathlib.Path(__file__).resolve().parents[2] / "pacl_ray"
    callers = [str(p.relative_to(root)) for p in root.rglob("*.py")
               if "torch.autocast(" in p.read_text() and p.name != "backbones.py"]
    assert callers == []
