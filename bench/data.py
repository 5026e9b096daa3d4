"""Data preparation speed and memory: cold and warm set-up of the embedded corpus and of a corpus ~15x larger.

    python bench/data.py [--copies 10] [--repeats 2] [--quick] [--rss-bound-mb 150]

Inputs:

- ``embedded``: the embedded corpus as ``conf/data/corpus.yaml`` prepares it (paragraph documents, its rules);
- ``real xN``: ``N`` copies of the real text in ``../shared/corpora/*.jsonl`` (Jane Austen and 三国演义; where
  that folder is absent, the embedded Austen corpus and the 三国演义 sample in tests/data), one paragraph per JSON line, each paragraph prefixed with its copy number so that deduplication keeps every copy,
  prepared as ``conf/data/text.yaml`` does. ``real x1`` is there to show that memory does not grow with N.

Every measurement runs in a fresh Python process (timed inside it, imports excluded), so its peak RSS is its own:

- ``bare encode_batch``: ``Tokenizer.encode_batch`` (and ``encode_batch_fast``, which skips offsets) over the
  same documents, already in memory, in the same 256 kB batches the pipeline uses, with the same tokenizer;
- ``cold``: ``prepare_corpus`` into an empty cache (read, clean, split, encode, pack, write), with that tokenizer
  given; and, as a default run does, with the tokenizer trained on the corpus;
- ``warm``: ``PretrainDataModule.prepare()`` from the cache (hashing the inputs, loading the index).

MB/s counts the UTF-8 text of the documents as read (before cleaning); Mtok/s the tokens produced. "vs bare" is
bare ``encode_batch`` time / this time over the same text: 1.0 would mean that reading, cleaning and packing
cost nothing. CPU seconds (this process and its workers) are shown too: on a shared machine they are steadier
than wall time. The sides take turns and each keeps its best of ``--repeats``.

Checks (exit code 1 if one fails): cold >= 0.7x bare ``encode_batch``; warm set-up of the embedded corpus
< 1 s; peak RSS of the cold preparation of ``real xN`` <= ``--rss-bound-mb`` and within 25 MB of ``real x1``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"
RSS_SLACK_MB = 25.0


# ---------------------------------------------------------------------------------------------------------
# child processes: one measurement each, printed as a JSON line


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (worker processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _child(job: dict[str, Any]) -> dict[str, Any]:
    from datamodules.corpus import CorpusSettings, prepare_corpus

    settings = CorpusSettings(**job["settings"])
    out: dict[str, Any] = {}
    if job["kind"] == "bare":
        from tokenizers import Tokenizer

        from datamodules.encoding import ENCODE_BATCH_BYTES
        from datamodules.sources import find_files, read_documents

        files, _ = find_files(settings.paths)
        docs = list(read_documents(files, settings.text_field, settings.split_paragraphs))
        tok = Tokenizer.from_file(job["tokenizer"])
        batches, batch, size = [], [], 0
        for d in docs:
            batch.append(d)
            size += len(d.encode("utf-8"))
            if size >= ENCODE_BATCH_BYTES:
                batches.append(batch)
                batch, size = [], 0
        batches.append(batch)
        encode = getattr(tok, job["method"])
        t0, c0 = time.perf_counter(), _cpu()
        tokens = 0
        for b in batches:
            tokens += sum(len(e.ids) for e in encode(b, add_special_tokens=False))
        out["seconds"], out["cpu"] = time.perf_counter() - t0, _cpu() - c0
        out["tokens"] = tokens
        out["text_bytes"] = sum(len(d.encode("utf-8")) for d in docs)
    elif job["kind"] == "cold":
        t0, c0 = time.perf_counter(), _cpu()
        corpus = prepare_corpus(settings, job["cache_dir"])
        out["seconds"], out["cpu"] = time.perf_counter() - t0, _cpu() - c0
        rep = corpus.report
        assert rep["cache"]["hit"] is False, "cold run found a cache"
        out["tokens"] = corpus.n_train + corpus.n_val
        out["timings"] = rep["timings"]
        out["documents_kept"] = rep["documents"]["kept"]
        out["encode_processes"] = rep["packing"]["encode_processes"]
        out["tokenizer"] = str(corpus.dir / "tokenizer.json")
    elif job["kind"] == "warm":
        from datamodules.pretrain import PretrainDataModule

        t0, c0 = time.perf_counter(), _cpu()
        dm = PretrainDataModule(
            paths=settings.paths,
            text_field=settings.text_field,
            split_paragraphs=settings.split_paragraphs,
            cleaning=settings.cleaning,
            tokenizer=settings.tokenizer,
            vocab_size=settings.vocab_size,
            val_fraction=settings.val_fraction,
            seed=settings.seed,
            cache_dir=job["cache_dir"],
        )
        dm.prepare()
        out["seconds"], out["cpu"] = time.perf_counter() - t0, _cpu() - c0
        assert dm.report["cache"]["hit"] is True, "warm run missed the cache"
        out["tokens"] = dm.corpus.n_train + dm.corpus.n_val
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out["workers_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if proc.returncode != 0:
        raise SystemExit(f"child {job['kind']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# inputs


def data_config(name: str) -> dict[str, Any]:
    """The settings of conf/data/<name>.yaml that CorpusSettings takes."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml"))
    keys = ("text_field", "split_paragraphs", "cleaning", "vocab_size", "tokenizer_sample_bytes", "val_fraction")
    return {k: cfg[k] for k in keys} | {"seed": 1234}


def real_sources() -> list[Path]:
    """../shared/corpora/*.jsonl when the checkout sits next to it; else the real text that ships with the
    project (the embedded Austen corpus and the test sample of 三国演义), so the benchmark runs anywhere."""
    return sorted(CORPORA.glob("*.jsonl")) or [
        ROOT / "datamodules" / "corpora" / "janeausten.jsonl.gz",
        ROOT / "tests" / "data" / "sanguo_yanyi_sample.jsonl",
    ]


def make_real_corpus(out: Path, copies: int) -> Path:
    """``copies`` jsonl files, each all of ``real_sources()``, one paragraph a line, prefixed by its copy."""
    import gzip

    out.mkdir(parents=True, exist_ok=True)
    paragraphs: list[str] = []
    for src in real_sources():
        with (gzip.open if src.suffix == ".gz" else open)(src, "rt", encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"].replace("\r\n", "\n")
                paragraphs += [p.strip() for p in text.split("\n\n") if p.strip()]
    for c in range(copies):
        with open(out / f"copy-{c:03d}.jsonl", "w", encoding="utf-8") as f:
            for i, p in enumerate(paragraphs):
                f.write(json.dumps({"text": f"[{c}.{i}] {p}"}, ensure_ascii=False) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------------
# the benchmark


def describe(job: dict[str, Any]) -> str:
    what = job["kind"] + (f" {job['method']}" if "method" in job else "")
    settings = job["settings"]
    if job["kind"] == "cold":
        what += ", tokenizer " + ("given" if settings.get("tokenizer") else "trained")
        what += (
            f", {settings['num_proc']} process{'es' * (settings['num_proc'] != 1)}" if settings.get("num_proc") else ""
        )
    return what


def best(jobs: list[dict[str, Any]], repeats: int) -> list[dict[str, Any]]:
    """Each job ``repeats`` times, taking turns; the fastest result of each, with the highest peak RSS seen."""
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    for _ in range(repeats):
        for i, job in enumerate(jobs):
            if job["kind"] == "cold":
                Path(job["cache_dir"]).mkdir(parents=True, exist_ok=True)
                job = {**job, "cache_dir": tempfile.mkdtemp(prefix="cold-", dir=job["cache_dir"])}
            r = {**run_child(job), "cache_dir": job.get("cache_dir"), "step": describe(job)}
            print(f"  {r['step']}: {r['seconds']:.3f} s, {r['cpu']:.2f} CPU s, {r['peak_rss_mb']:.0f} MB", flush=True)
            prev = results[i]
            if prev is not None:
                rss = max(r["peak_rss_mb"], prev["peak_rss_mb"])
                r = {**(prev if prev["seconds"] < r["seconds"] else r), "peak_rss_mb": rss}
            results[i] = r
    return [r for r in results if r is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=10, help="copies of the real corpora in the large corpus")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="skip the large corpus's trained-tokenizer runs")
    parser.add_argument("--rss-bound-mb", type=float, default=150.0, help="the memory bound checked")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    from datamodules.sources import EMBEDDED_CORPUS

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"cores: {cpus}, load average {load:.1f}; work dir {work}; best of {args.repeats}", flush=True)
    print("real text: " + ", ".join(str(p.relative_to(ROOT.parent)) for p in real_sources()), flush=True)
    real = make_real_corpus(work / "real", args.copies)
    big = f"real x{args.copies}"
    inputs = {
        "embedded": {"paths": [str(EMBEDDED_CORPUS)], **data_config("corpus")},
        "real x1": {"paths": [str(real / "copy-000.jsonl")], **data_config("text")},
        big: {"paths": [str(real)], **data_config("text")},
    }

    print("embedded, tokenizer trained (a default run) ...", flush=True)
    trained = best([{"kind": "cold", "settings": inputs["embedded"], "cache_dir": str(work / "emb")}], args.repeats)
    tok = trained[0]["tokenizer"]  # "the" tokenizer of every comparison below
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in inputs}
    results["embedded"] += trained
    for name, settings in inputs.items():
        given = {**settings, "tokenizer": tok}
        cache = str(work / name.replace(" ", "-"))
        jobs: list[dict[str, Any]] = []
        if name != "real x1":
            jobs += [
                {"kind": "bare", "settings": given, "tokenizer": tok, "method": m}
                for m in ("encode_batch", "encode_batch_fast")
            ]
        jobs.append({"kind": "cold", "settings": {**given, "num_proc": 1}, "cache_dir": cache})
        if name == big:
            jobs.append({"kind": "cold", "settings": {**given, "num_proc": 2}, "cache_dir": cache})
        if name != "embedded" and not args.quick:
            jobs.append({"kind": "cold", "settings": settings, "cache_dir": cache})
        print(f"{name}: {len(jobs)} jobs x {args.repeats} ...", flush=True)
        res = best(jobs, args.repeats)
        warm_cache = (trained[0] if name == "embedded" else res[-1])["cache_dir"]
        warm_settings = settings if name == "embedded" or not args.quick else given
        res += best([{"kind": "warm", "settings": warm_settings, "cache_dir": warm_cache}], args.repeats)
        results[name] += res

    # the table
    print()
    head = f"{'input':<10} {'text MB':>7}  {'step':<36} {'seconds':>8} {'CPU s':>6} {'MB/s':>6} {'Mtok/s':>6}"
    head += f" {'vs bare':>7} {'RSS MB':>6}"
    print(head)
    print("-" * len(head))
    from datamodules.sources import find_files, read_documents

    text_mb: dict[str, float] = {}
    bare: dict[str, dict[str, Any]] = {}
    for name, settings in inputs.items():
        docs = read_documents(find_files(settings["paths"])[0], settings["text_field"], settings["split_paragraphs"])
        text_mb[name] = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    for name, rows in results.items():
        bare_rows = [r for r in rows if r["step"] == "bare encode_batch"]
        if bare_rows:
            bare[name] = bare_rows[0]
        for r in sorted(rows, key=lambda r: ("warm" in r["step"], "cold" in r["step"], r["step"])):
            mb, secs = text_mb[name], r["seconds"]
            vs = f"{bare[name]['seconds'] / secs:.2f}x" if name in bare and "warm" not in r["step"] else ""
            print(
                f"{name:<10} {mb:>7.1f}  {r['step']:<36} {secs:>8.3f} {r['cpu']:>6.2f} {mb / secs:>6.2f} "
                f"{r['tokens'] / secs / 1e6:>6.3f} {vs:>7} {r['peak_rss_mb']:>6.0f}"
            )

    # the checks
    def row(name: str, step: str) -> dict[str, Any] | None:
        return next((r for r in results[name] if r["step"] == step), None)

    checks: list[tuple[str, bool, str]] = []
    for name in ("embedded", big):
        cold = row(name, "cold, tokenizer given, 1 process")
        assert cold is not None
        ratio, cpu_ratio = bare[name]["seconds"] / cold["seconds"], bare[name]["cpu"] / cold["cpu"]
        fast = row(name, "bare encode_batch_fast")
        assert fast is not None
        checks.append(
            (
                f"{name}: cold >= 0.7x bare encode_batch",
                ratio >= 0.7,
                f"{ratio:.2f}x wall, {cpu_ratio:.2f}x CPU (vs encode_batch_fast: {fast['seconds'] / cold['seconds']:.2f}x)",
            )
        )
    warm = row("embedded", "warm")
    assert warm is not None
    checks.append(("embedded: warm set-up < 1 s", warm["seconds"] < 1.0, f"{warm['seconds']:.3f} s"))
    one, many = row("real x1", "cold, tokenizer given, 1 process"), row(big, "cold, tokenizer given, 1 process")
    assert one is not None and many is not None
    ok = many["peak_rss_mb"] <= args.rss_bound_mb and many["peak_rss_mb"] <= one["peak_rss_mb"] + RSS_SLACK_MB
    checks.append(
        (
            f"{big}: peak RSS <= {args.rss_bound_mb:.0f} MB and <= real x1 + {RSS_SLACK_MB:.0f} MB (tokenizer given)",
            ok,
            f"{many['peak_rss_mb']:.0f} MB vs {one['peak_rss_mb']:.0f} MB",
        )
    )
    one_t, many_t = row("real x1", "cold, tokenizer trained"), row(big, "cold, tokenizer trained")
    if one_t is not None and many_t is not None:
        checks.append(
            (
                f"{big}: peak RSS <= real x1 + {RSS_SLACK_MB:.0f} MB (tokenizer trained)",
                many_t["peak_rss_mb"] <= one_t["peak_rss_mb"] + RSS_SLACK_MB,
                f"{many_t['peak_rss_mb']:.0f} MB vs {one_t['peak_rss_mb']:.0f} MB",
            )
        )
    print()
    failed = False
    for what, ok, value in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {what}: {value}")
        failed |= not ok
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
