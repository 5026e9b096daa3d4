"""The benchmark scripts run end to end on tiny settings (their figures are for bench/README.md, not tests)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

RUNS = {
    "train_cpu": [
        "bench/train_cpu.py",
        "--variants",
        "torch",
        "default",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--rounds",
        "1",
    ],
    "generate": ["bench/generate.py", "--shapes", "64x2", "--new", "4", "--batches", "1", "2", "--repeats", "1"],
    # one run of each trainer kind (compile is covered by the training tests; here it would triple the time)
    "gpu_paths_on_cpu": [
        "bench/gpu.py",
        "--device",
        "cpu",
        "--tiny",
        "--no-compile",
        "--runs",
        "1b:gpu",
        "7b:fsdp",
        "7b:qlora",
    ],  # fmt: skip
    "scaling": [
        "bench/scaling.py",
        "--models",
        "tiny",
        "--seq-lens",
        "64",
        "128",
        "--tokens",
        "tiny=512",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--rounds",
        "1",
        "--set",
        "model.n_layers=1",
        "--reference",
        "tiny:128",
    ],
    "data": ["bench/data.py", "--quick", "--repeats", "1", "--copies", "3", "--files", "20"],
    "tokenizer_sample": ["bench/tokenizer_sample.py", "--vocab", "512", "--samples-mb", "0.5", "--scale-mb"],
    "sft_packing": ["bench/sft_packing.py", "--steps", "1", "--warmup", "1", "--rounds", "1", "--chat-examples", "200"],
    "document_mask": ["bench/document_mask.py", "--steps", "2", "--warmup", "1", "--no-attention"],
    "attention": ["bench/attention.py", "--steps", "2", "--warmup", "1", "--calls", "2"],
    "serve": ["bench/serve.py", "--smoke"],
    "quality": [
        "bench/quality.py",
        "--budget",
        "1",
        "--variants",
        "today",
        "muon",
        "--calibration-steps",
        "3",
        "--val-batches",
        "2",
        "--set",
        "model.n_layers=1",
        "data.vocab_size=512",
        "data.seq_len=64",
    ],  # fmt: skip
}


@pytest.mark.parametrize("name", list(RUNS))
def test_bench_script_runs(name, tmp_path):
    proc = subprocess.run(
        [sys.executable, *RUNS[name]], cwd=ROOT, capture_output=True, text=True, timeout=900, env=None
    )
    if name == "data":  # exit 1 means a speed or memory check missed: a figure for the README, not a test failure
        assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
        checks = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
        assert len(checks) == 5, proc.stdout[-3000:]
    else:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "|" in proc.stdout  # printed its table
        assert "| failed:" not in proc.stdout, proc.stdout[-3000:]  # a run that failed is a row, not an exit code
