"""llm.serve under concurrent clients: tokens/s and latency with batching, against the same requests served one
at a time.

    python bench/serve.py [--model tiny --clients 1 4 16 --requests 32 --new 64 --threads N] [--smoke]

The model is randomly initialised (``conf/model/<--model>.yaml``'s shape, tokenizer trained on the embedded corpus
in seconds) and written in our checkpoint format: generation speed depends on the shape, not on the weights, and
untrained weights hardly ever pick EOS, so every request generates exactly ``--new`` tokens (greedy) and each
side does the same work. Two servers are started as `python -m llm.serve ... port=0` subprocesses on 127.0.0.1:
``max_batch=16`` (batched) and ``max_batch=1`` (one request at a time, the baseline). For each number of
concurrent clients, the same ``--requests`` prompts (book sentences of 8-48 tokens) go to each server in turn from
that many client threads, each sending its next request when its answer came (a closed loop); the answers of the
two servers are checked equal. Prints, per server and client count, the new tokens per second (all new tokens /
wall time of the round), the latency of a request (mean, p50, p95), the mean rows per forward step (the
server's ``/metrics``: tokens / steps), the server process's CPU seconds per 1,000 new tokens (which a busy shared machine disturbs less
than the wall clock) and batching's speed-up in tokens/s.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sentences(limit: int) -> list[str]:
    with gzip.open(ROOT / "datamodules" / "corpora" / "janeausten.jsonl.gz", "rt", encoding="utf-8") as f:
        text = " ".join(json.loads(line)["text"] for _, line in zip(range(20), f))
    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if 30 < len(s) < 200]
    return out[:limit]


def write_checkpoint(model: str, max_seq_len: int, path: Path) -> None:
    """A randomly initialised model of conf/model/<model>.yaml's shape, with a BPE tokenizer, in our format."""
    import torch
    from omegaconf import OmegaConf

    from datamodules.tokenizer import train_tokenizer
    from llm.core.config import ModelConfig
    from llm.core.model import Transformer

    tok = train_tokenizer(sentences(20_000), vocab_size=4096)
    fields = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{model}.yaml")).items()
              if k not in ("defaults", "_target_")}  # fmt: skip
    cfg = ModelConfig.from_dict({**fields, "vocab_size": tok.get_vocab_size(), "max_seq_len": max_seq_len})
    torch.manual_seed(0)
    net = Transformer(cfg)
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": cfg.to_dict()}, "tokenizer": tok.to_str()}, path)


def start_server(ckpt: Path, max_batch: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm.serve", f"ckpt_path={ckpt}", "port=0", f"max_batch={max_batch}"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    line = proc.stdout.readline()
    match = re.search(r"on (http://127\.0\.0\.1:\d+) ", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, match[1]


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time (Linux /proc): the server's own work, whatever else loads the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_round(url: str, model: str, prompts: list[str], new: int, clients: int) -> tuple[float, list[float], list]:
    """Wall time, per-request latencies and answers of ``prompts`` sent by ``clients`` closed-loop threads."""
    import httpx

    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(prompts)):
        todo.put(i)
    latencies: list[float] = [0.0] * len(prompts)
    answers: list = [None] * len(prompts)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                body = {"model": model, "prompt": prompts[i], "max_tokens": new, "temperature": 0}
                start = time.perf_counter()
                r = http.post("/v1/completions", json=body)
                latencies[i] = time.perf_counter() - start
                r.raise_for_status()
                answers[i] = (r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="conf/model/<name>.yaml's shape, random weights")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32, help="requests per round")
    parser.add_argument("--new", type=int, default=64, help="max_tokens of each request")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the servers (OMP_NUM_THREADS)")
    parser.add_argument("--smoke", action="store_true", help="a few tiny requests: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.requests, args.new, args.max_seq_len = [1, 2], 4, 4, 64
    print(f"settings: {vars(args)}", flush=True)
    prompts = [s[:160] for s in sentences(args.requests * 4)][: args.requests]  # 8-48 tokens each

    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / f"random-{args.model}.ckpt"
        write_checkpoint(args.model, args.max_seq_len, ckpt)
        servers = {name: start_server(ckpt, mb, args.threads) for name, mb in [("batched", 16), ("one at a time", 1)]}
        rows = []
        try:
            for _, url in servers.values():  # warm-up: first calls pay for allocation
                run_round(url, ckpt.stem, prompts[:2], args.new, 2)
            for clients in args.clients:
                results, cpu, per_batch = {}, {}, {}
                for name, (proc, url) in servers.items():  # the two servers take turns on the same requests
                    before, cpu0 = httpx.get(f"{url}/metrics").json(), cpu_seconds(proc.pid)
                    results[name] = run_round(url, ckpt.stem, prompts, args.new, clients)
                    after, cpu[name] = httpx.get(f"{url}/metrics").json(), cpu_seconds(proc.pid) - cpu0
                    # rows per forward pass: rows join running batches, so a batch's size at its start says little
                    steps = after["steps"] - before["steps"]
                    per_batch[name] = (after["tokens"] - before["tokens"]) / max(steps, 1)
                texts = {name: [a[0] for a in r[2]] for name, r in results.items()}
                if texts["batched"] != texts["one at a time"]:
                    raise SystemExit(f"{clients} clients: batched answers differ from one-at-a-time ones")
                speed = {}
                for name, (wall, lat, answers) in results.items():
                    tokens = sum(a[1] for a in answers)
                    speed[name] = tokens / wall
                    lat_sorted = sorted(lat)
                    p95 = lat_sorted[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
                    rows.append((clients, name, len(lat), tokens, speed[name], statistics.mean(lat),
                                 statistics.median(lat), p95, per_batch[name], 1000 * cpu[name] / tokens))  # fmt: skip
                rows.append((clients, "speed-up", speed["batched"] / speed["one at a time"]))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)

    print(
        "\n| clients | server | requests | new tokens | tokens/s | latency mean (s) | p50 (s) | p95 (s) "
        "| rows per step | server CPU s per 1k tokens |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if row[1] == "speed-up":
            print(f"| {row[0]} | batched / one at a time | | | x{row[2]:.2f} | | | | | |")
        else:
            c, name, n, tokens, tps, mean, p50, p95, size, cpu_k = row
            print(f"| {c} | {name} | {n} | {tokens} | {tps:.1f} | {mean:.3f} | {p50:.3f} | {p95:.3f} | {size:.1f} "
                  f"| {cpu_k:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
