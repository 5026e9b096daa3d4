"""Device peaks (MFU's denominator): the datasheet table looked up by device name, the CPU's peak measured once."""

from __future__ import annotations

import json

import pytest
import torch

from llm.runtime import hardware
from llm.runtime.hardware import _GPU_PEAKS, gpu_peak_flops, precision_kind


@pytest.mark.parametrize(
    ("device_name", "entry"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100 pcie"),  # the more specific entry wins over "h100"
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA A10G", "a10g"),
        ("Tesla V100-SXM2-16GB", "v100"),
    ],
)
def test_gpu_names_find_their_datasheet_entry(device_name, entry):
    for kind in ("bf16", "fp32"):
        assert gpu_peak_flops(device_name, kind) == _GPU_PEAKS[entry][kind]


def test_unknown_gpu_has_no_peak():
    assert gpu_peak_flops("NVIDIA GeForce RTX 4090", "bf16") is None  # no MFU rather than a wrong one


def test_table_holds_dense_peaks():
    # the dense bf16 peak of every part is above its fp32 peak, and no entry is a 2:4-sparse figure (H100/H200 dense
    # bf16 is below 1e15 FLOP/s; Lightning's table lists 2e15 for H200, sparse)
    assert all(peaks["bf16"] > peaks["fp32"] for peaks in _GPU_PEAKS.values())
    assert all(peaks["bf16"] < 1e15 for peaks in _GPU_PEAKS.values())


@pytest.mark.parametrize(
    ("precision", "kind"),
    [
        ("bf16-mixed", "bf16"),
        ("16-mixed", "bf16"),
        ("bf16-true", "bf16"),
        ("32-true", "fp32"),
        (None, "fp32"),
        (32, "fp32"),
    ],
)
def test_precision_kind(precision, kind):
    assert precision_kind(precision) == kind


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "CACHE", tmp_path)
    first = hardware.cpu_peak_flops("fp32", size=64, repeats=2)
    assert first > 0
    cached = json.loads((tmp_path / "cpu_peak.json").read_text())
    assert list(cached.values()) == [first]

    def no_measurement(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(torch, "randn", no_measurement)
    assert hardware.cpu_peak_flops("fp32", size=64, repeats=2) == first
