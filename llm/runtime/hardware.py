"""What the device can do: peak FLOP/s (the denominator of MFU) and memory (the planner's budget)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from llm.runtime.topology import accelerator_of

# Dense (not 2:4 sparse) datasheet peaks in FLOP/s, per device. Lightning's own table lists sparse figures
# for some parts (2.0e15 for H200), which would halve every MFU we report, so we keep ours.
_GPU_PEAKS = {
    "h200": {"bf16": 989e12, "fp32": 67e12},
    "h100": {"bf16": 989e12, "fp32": 67e12},  # SXM; the PCIe part is lower, matched below first
    "h100 pcie": {"bf16": 756e12, "fp32": 51e12},
    "a100": {"bf16": 312e12, "fp32": 19.5e12},
    "l40s": {"bf16": 362e12, "fp32": 91.6e12},
    "a10g": {"bf16": 125e12, "fp32": 31.2e12},
    "l4": {"bf16": 121e12, "fp32": 30.3e12},
    "v100": {"bf16": 125e12, "fp32": 15.7e12},  # fp16 tensor cores; V100 has no bf16
}

CACHE = Path(os.environ.get("LLM_CACHE", Path.home() / ".cache" / "llm-trainer"))


def precision_kind(precision: str | int | None) -> str:
    """'bf16' for any 16-bit precision setting (tensor-core math), else 'fp32'."""
    return "bf16" if precision is not None and "16" in str(precision) else "fp32"


def gpu_peak_flops(name: str, kind: str) -> float | None:
    name = name.lower()
    for key in sorted(_GPU_PEAKS, key=len, reverse=True):  # most specific name first
        if all(part in name for part in key.split()):
            return _GPU_PEAKS[key][kind]
    return None


def cpu_peak_flops(kind: str, *, size: int = 1024, repeats: int = 8) -> float:
    """Measured matmul FLOP/s of this CPU for ``kind``, cached per machine and thread count.

    CPUs have no datasheet number we can trust (it depends on AVX-512/AMX, clocks and thread count), so the
    peak is what a large matmul achieves, measured once (about a second) and reused.
    """
    key = f"{os.uname().nodename}-{torch.get_num_threads()}-{kind}-{torch.__version__}"
    path = CACHE / "cpu_peak.json"
    table: dict[str, float] = {}
    if path.exists():
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
    if key in table:
        return table[key]
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    peak = 2 * size**3 * repeats / (time.perf_counter() - start)
    table[key] = peak
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return peak


def peak_flops(device: torch.device, precision: str | int | None) -> float | None:
    """Peak FLOP/s of one ``device`` at ``precision``; None when unknown (MFU is then not reported)."""
    kind = precision_kind(precision)
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), kind)
    if device.type == "cpu":
        return cpu_peak_flops(kind)
    return None


def device_memory_bytes(device: torch.device) -> int:
    """Memory available to one process on ``device``: the GPU's total, or the host's physical memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: allocated by torch on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): only then is bf16 autocast faster."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, so probed defensively
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def fastest_precision(accelerator: str) -> str:
    """The fastest precision that trains correctly on the hardware present (``trainer.precision=auto``).

    GPUs with bf16 (Ampere and later) and CPUs with native bf16 get ``bf16-mixed`` (float32 weights and
    optimizer, bf16 matmuls); everything else ``32-true``: without native bf16 a CPU emulates it and bf16-mixed
    is slower than float32 (README's performance table: bf16-mixed vs 32-true).
    """
    if accelerator_of(accelerator) == "cuda":
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"
