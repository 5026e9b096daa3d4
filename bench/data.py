"""Data preparation speed and memory: cold, incremental and warm set-up, over 1 and 2 processes, at two sizes.

    python bench/data.py [--copies 10] [--files 100] [--repeats 2] [--quick] [--rss-bound-mb 150]
                         [--sizes-mb 200 1000]

Inputs:

- ``embedded``: the embedded corpus as ``conf/data/corpus.yaml`` prepares it (paragraph documents, its rules);
- ``real xN``: ``N`` copies of the real text in ``../shared/corpora/*.jsonl`` (Jane Austen and 三国演义; where
  that folder is absent, the embedded Austen corpus and the 三国演义 sample in tests/data), one paragraph per JSON
  line, each paragraph prefixed with its copy number so that deduplication keeps every copy, spread over
  ``--files`` files and prepared as ``conf/data/text.yaml`` does. ``real x1`` (one file) is there to show that
  memory does not grow with N.

Every measurement runs in a fresh Python process (timed inside it, imports excluded), so its peak RSS is its own
(worker processes' peak is shown apart):

- ``bare encode_batch``: ``Tokenizer.encode_batch`` (and ``encode_batch_fast``, which skips offsets) over the
  same documents, already in memory, in the same 256 kB batches the pipeline uses, with the same tokenizer, on
  every core (its Rust threads);
- ``cold``: ``prepare_corpus`` into an empty cache (read, clean, split, encode, pack, write), with that tokenizer
  given, in 1 and in 2 processes (one file per task); and, as a default run does, with the tokenizer trained;
- ``incremental``: one of the ``--files`` files changed (a paragraph added) in a cache that the cold 1-process
  build filled: only that file is read, cleaned and encoded again; dedup, the split and the shards are redone;
- ``warm``: ``PretrainDataModule.prepare()`` from the cache (hashing the inputs, loading the index).

With ``--sizes-mb A B``, corpora of about A and B MB of text (copies of the real text in ``--files`` files) are
prepared cold, tokenizer given and trained (``data.tokenizer_sample_bytes`` as conf/data/text.yaml sets it), with
automatic processes, and their peak RSS compared.

MB/s counts the UTF-8 text of the documents as read (before cleaning); Mtok/s the tokens produced. "vs bare" is
bare ``encode_batch`` time / this time over the same text: 1.0 would mean that reading, cleaning and packing
cost nothing. CPU seconds (this process and its workers) are shown too: on a shared machine they are steadier
than wall time. The sides take turns and each keeps its best of ``--repeats``.

Checks (exit code 1 if one fails): ``real xN`` cold in 2 processes >= 0.9x bare ``encode_batch``, and >= 1.7x
the 1-process build; one changed file < 10% of the 1-process full build; warm set-up of the embedded corpus
< 1 s; peak RSS of the cold preparation of ``real xN`` <= ``--rss-bound-mb`` and within 25 MB of ``real x1``'s;
with ``--sizes-mb``, peak RSS at B within 10% of that at A.
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
    if job.get("cores"):  # before tokenizers starts its thread pool: it sizes it by the cores this process may use
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: job["cores"]])
        os.environ["RAYON_NUM_THREADS"] = str(job["cores"])
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
        out["files"] = rep["files"]
        out["trained_on_bytes"] = rep["tokenizer"].get("trained_on_bytes")
        out["tokenizer"] = str(corpus.dir / "tokenizer.json")
    elif job["kind"] == "incremental":
        import shutil

        # a copy of the inputs (entries are keyed by content, not path), one file of it changed: a new paragraph,
        # different in every repeat, so that no corpus entry of an earlier repeat matches
        src, work = Path(job["inputs"]), Path(tempfile.mkdtemp(prefix="changed-", dir=job["cache_dir"]))
        shutil.copytree(src, work / src.name)
        files = sorted((work / src.name).glob("*.jsonl"))
        with open(files[len(files) // 2], "a", encoding="utf-8") as f:
            f.write(json.dumps({"text": f"A paragraph added at {time.time_ns()} to change this file."}) + "\n")
        settings.paths = [str(work / src.name)]
        t0, c0 = time.perf_counter(), _cpu()
        corpus = prepare_corpus(settings, job["cache_dir"])
        out["seconds"], out["cpu"] = time.perf_counter() - t0, _cpu() - c0
        shutil.rmtree(work)
        assert corpus.report["cache"]["hit"] is False, "the changed corpus was found in the cache"
        out["tokens"] = corpus.n_train + corpus.n_val
        out["files"] = corpus.report["files"]
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


def real_paragraphs() -> list[str]:
    import gzip

    paragraphs: list[str] = []
    for src in real_sources():
        with (gzip.open if src.suffix == ".gz" else open)(src, "rt", encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"].replace("\r\n", "\n")
                paragraphs += [p.strip() for p in text.split("\n\n") if p.strip()]
    return paragraphs


def make_real_corpus(out: Path, copies: int, files: int = 1) -> Path:
    """``copies`` times all of ``real_sources()``, one paragraph a line, each prefixed by its copy, written in order
    over ``files`` jsonl files of about the same size."""
    out.mkdir(parents=True, exist_ok=True)
    paragraphs = real_paragraphs()
    total = copies * len(paragraphs)
    per_file = -(-total // files)
    f = None
    for n in range(total):
        if n % per_file == 0:
            if f is not None:
                f.close()
            f = open(out / f"part-{n // per_file:04d}.jsonl", "w", encoding="utf-8")
        c, i = divmod(n, len(paragraphs))
        f.write(json.dumps({"text": f"[{c}.{i}] {paragraphs[i]}"}, ensure_ascii=False) + "\n")
    if f is not None:
        f.close()
    return out


# ---------------------------------------------------------------------------------------------------------
# the benchmark


def describe(job: dict[str, Any]) -> str:
    what = job["kind"] + (f" {job['method']}" if "method" in job else "")
    settings = job["settings"]
    if job["kind"] in ("cold", "incremental"):
        what += ", tokenizer " + ("given" if settings.get("tokenizer") else "trained")
        n = settings.get("num_proc")
        what += f", {n} process{'es' * (n != 1)}" if n else ""
    if job["kind"] == "incremental":
        what += ", 1 file changed"
    if job.get("cores"):
        what += f", {job['cores']} core{'s' * (job['cores'] != 1)}"
    return what


def best(jobs: list[dict[str, Any]], repeats: int) -> list[dict[str, Any]]:
    """Each job ``repeats`` times, taking turns; the fastest result of each, with the highest peak RSS seen."""
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    for _ in range(repeats):
        for i, job in enumerate(jobs):
            if job["kind"] == "cold":  # each repeat into its own empty cache
                Path(job["cache_dir"]).mkdir(parents=True, exist_ok=True)
                job = {**job, "cache_dir": tempfile.mkdtemp(prefix="cold-", dir=job["cache_dir"])}
            r = {**run_child(job), "cache_dir": job.get("cache_dir"), "step": describe(job), "kind": job["kind"]}
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
    parser.add_argument("--files", type=int, default=100, help="files the large corpora are written as")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="skip the large corpus's trained-tokenizer runs")
    parser.add_argument("--rss-bound-mb", type=float, default=150.0, help="the memory bound checked")
    parser.add_argument("--sizes-mb", type=float, nargs=2, metavar=("A", "B"), help="peak RSS at two corpus sizes")
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
    real = make_real_corpus(work / "real", args.copies, args.files)
    big = f"real x{args.copies}"
    inputs = {
        "embedded": {"paths": [str(EMBEDDED_CORPUS)], **data_config("corpus")},
        "real x1": {"paths": [str(make_real_corpus(work / "real1", 1))], **data_config("text")},
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
        if name == big:  # 1 and 2 cores: the 1-core build is what 2 processes are measured against
            jobs.append({"kind": "bare", "settings": given, "tokenizer": tok, "method": "encode_batch", "cores": 1})
            jobs.append({"kind": "cold", "settings": {**given, "num_proc": 1}, "cache_dir": cache, "cores": 1})
            jobs.append({"kind": "cold", "settings": {**given, "num_proc": 2}, "cache_dir": cache})
        if name != "embedded" and not args.quick:
            jobs.append({"kind": "cold", "settings": settings, "cache_dir": cache})
        print(f"{name}: {len(jobs)} jobs x {args.repeats} ...", flush=True)
        res = best(jobs, args.repeats)
        if name == big:  # into the cache a 1-process cold build filled
            filled = next(r for r in res if r["step"] == "cold, tokenizer given, 1 process")["cache_dir"]
            job = {
                "kind": "incremental",
                "settings": {**given, "num_proc": 1},
                "cache_dir": filled,
                "inputs": str(real),
            }
            res += best([job], args.repeats)
        warm_settings = settings if name == "embedded" or not args.quick else given
        warm_step = "cold, tokenizer " + ("trained" if warm_settings is settings else "given, 1 process")
        warm_cache = (trained[0] if name == "embedded" else next(r for r in res if r["step"] == warm_step))["cache_dir"]
        res += best([{"kind": "warm", "settings": warm_settings, "cache_dir": warm_cache}], args.repeats)
        results[name] += res

    sized: dict[str, dict[str, Any]] = {}
    if args.sizes_mb:
        per_copy = sum(len(p.encode("utf-8")) for p in real_paragraphs()) / 1e6
        for mb in args.sizes_mb:
            copies = max(1, round(mb / per_copy))
            name = f"{copies * per_copy:.0f} MB"
            src = make_real_corpus(work / f"size-{mb:g}", copies, args.files)
            settings = {"paths": [str(src)], **data_config("text")}
            print(f"{name} ({copies} copies in {args.files} files): 2 jobs ...", flush=True)
            jobs = [
                {"kind": "cold", "settings": {**settings, "tokenizer": tok}, "cache_dir": str(work / f"c-{mb:g}")},
                {"kind": "cold", "settings": settings, "cache_dir": str(work / f"c-{mb:g}")},
            ]
            sized[name] = {r["step"]: r for r in best(jobs, 1)}
            import shutil

            shutil.rmtree(src)
            shutil.rmtree(work / f"c-{mb:g}")

    print_table(inputs, results)
    checks = check(results, big, args.rss_bound_mb)
    if sized:
        print(
            f"\n{'size':<8} {'step':<28} {'seconds':>8} {'MB/s':>6} {'RSS MB':>7} {'workers':>8}  tokenizer trained on"
        )
        for name, rows in sized.items():
            for r in rows.values():
                used = r.get("trained_on_bytes")
                print(
                    f"{name:<8} {r['step']:<28} {r['seconds']:>8.1f} {float(name.split()[0]) / r['seconds']:>6.2f} "
                    f"{r['peak_rss_mb']:>7.0f} {r['workers_peak_rss_mb']:>8.0f}  {'' if used is None else f'{used / 1e6:.0f} MB'}"
                )
        (a, ra), (b, rb) = sized.items()
        for step in ra:
            peak_a = max(ra[step]["peak_rss_mb"], ra[step]["workers_peak_rss_mb"])
            peak_b = max(rb[step]["peak_rss_mb"], rb[step]["workers_peak_rss_mb"])
            checks.append(
                (f"{step}: peak RSS (of any process) at {b} within 10% of {a}", peak_b <= 1.1 * peak_a,
                 f"{peak_b:.0f} MB vs {peak_a:.0f} MB ({peak_b / peak_a:.2f}x)")
            )  # fmt: skip
    print()
    failed = False
    for what, ok, value in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {what}: {value}")
        failed |= not ok
    sys.exit(1 if failed else 0)


def print_table(inputs: dict[str, dict[str, Any]], results: dict[str, list[dict[str, Any]]]) -> None:
    print()
    head = f"{'input':<10} {'text MB':>7}  {'step':<44} {'seconds':>8} {'CPU s':>6} {'MB/s':>6} {'Mtok/s':>6}"
    head += f" {'vs bare':>7} {'RSS MB':>6} {'workers':>7}  files cleaned/encoded"
    print(head)
    print("-" * len(head))
    from datamodules.sources import find_files, read_documents

    for name, settings in inputs.items():
        docs = read_documents(find_files(settings["paths"])[0], settings["text_field"], settings["split_paragraphs"])
        mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
        rows = results[name]
        bare = next((r for r in rows if r["step"] == "bare encode_batch"), None)
        for r in sorted(rows, key=lambda r: ("warm" in r["step"], "cold" in r["step"], r["step"])):
            secs = r["seconds"]
            vs = f"{bare['seconds'] / secs:.2f}x" if bare and r["kind"] in ("bare", "cold") else ""
            files = r.get("files")
            done = f"{files['files']}: {files['cleaned']}/{files['encoded']}" if files else ""
            print(
                f"{name:<10} {mb:>7.1f}  {r['step']:<44} {secs:>8.3f} {r['cpu']:>6.2f} {mb / secs:>6.2f} "
                f"{r['tokens'] / secs / 1e6:>6.3f} {vs:>7} {r['peak_rss_mb']:>6.0f} {r['workers_peak_rss_mb']:>7.0f}  {done}"
            )


def check(results: dict[str, list[dict[str, Any]]], big: str, rss_bound_mb: float) -> list[tuple[str, bool, str]]:
    def row(name: str, step: str) -> dict[str, Any]:
        found = next((r for r in results[name] if r["step"] == step), None)
        assert found is not None, (name, step)
        return found

    checks: list[tuple[str, bool, str]] = []
    bare, fast = row(big, "bare encode_batch"), row(big, "bare encode_batch_fast")
    one, two = row(big, "cold, tokenizer given, 1 process"), row(big, "cold, tokenizer given, 2 processes")
    ratio = bare["seconds"] / two["seconds"]
    checks.append(
        (f"{big}: cold in 2 processes >= 0.9x bare encode_batch", ratio >= 0.9,
         f"{ratio:.2f}x wall, {bare['cpu'] / two['cpu']:.2f}x CPU (vs encode_batch_fast: "
         f"{fast['seconds'] / two['seconds']:.2f}x)")
    )  # fmt: skip
    single = row(big, "cold, tokenizer given, 1 process, 1 core")
    speedup = single["seconds"] / two["seconds"]
    checks.append(
        (f"{big}: 2 processes on 2 cores >= 1.7x 1 process on 1 core (cold, tokenizer given)", speedup >= 1.7,
         f"{speedup:.2f}x ({single['seconds']:.2f} s vs {two['seconds']:.2f} s; 1 process on 2 cores: "
         f"{single['seconds'] / one['seconds']:.2f}x)")
    )  # fmt: skip
    inc = row(big, "incremental, tokenizer given, 1 process, 1 file changed")
    share = inc["seconds"] / one["seconds"]
    files = inc["files"]
    checks.append(
        (f"{big}: one changed file of {files['files']} < 10% of the full build", share < 0.1,
         f"{inc['seconds']:.2f} s vs {one['seconds']:.2f} s ({100 * share:.1f}%; cleaned {files['cleaned']}, "
         f"encoded {files['encoded']})")
    )  # fmt: skip
    warm = row("embedded", "warm")
    checks.append(("embedded: warm set-up < 1 s", warm["seconds"] < 1.0, f"{warm['seconds']:.3f} s"))
    small = row("real x1", "cold, tokenizer given, 1 process")
    ok = one["peak_rss_mb"] <= rss_bound_mb and one["peak_rss_mb"] <= small["peak_rss_mb"] + RSS_SLACK_MB
    checks.append(
        (f"{big}: peak RSS <= {rss_bound_mb:.0f} MB and <= real x1 + {RSS_SLACK_MB:.0f} MB (tokenizer given)", ok,
         f"{one['peak_rss_mb']:.0f} MB vs {small['peak_rss_mb']:.0f} MB")
    )  # fmt: skip
    small_t = next((r for r in results["real x1"] if r["step"] == "cold, tokenizer trained"), None)
    big_t = next((r for r in results[big] if r["step"] == "cold, tokenizer trained"), None)
    if small_t is not None and big_t is not None:
        checks.append(
            (f"{big}: peak RSS <= real x1 + {RSS_SLACK_MB:.0f} MB (tokenizer trained)",
             big_t["peak_rss_mb"] <= small_t["peak_rss_mb"] + RSS_SLACK_MB,
             f"{big_t['peak_rss_mb']:.0f} MB vs {small_t['peak_rss_mb']:.0f} MB")
        )  # fmt: skip
    return checks


if __name__ == "__main__":
    main()
