"""data.engine: the per-file steps as Ray tasks (a local Ray of 2 CPUs, started once for the module) give the corpus
that local processes give, byte for byte, and the same cache entry; `python -m llm.prepare data.engine=ray` starts
its own Ray and train's DataModule then finds the entry; a cluster at RAY_ADDRESS is used; a bad file is the same
one-line error under either engine; a bad engine, or Ray missing, is refused in one line."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

from datamodules import engine, merge
from datamodules.corpus import CorpusSettings, PackedCorpus, prepare_corpus
from datamodules.pretrain import PretrainDataModule
from datamodules.sources import EMBEDDED_CORPUS, DataError, read_file
from llm import prepare
from tests.conftest import ROOT

RAY_REASON = 'data.engine=ray needs Ray: pip install -e ".[ray]"'
CLEANING = [
    {"name": "whitespace"},
    {"name": "min_chars", "value": 16},
    {"name": "dedup"},
    {"name": "near_dedup", "num_perm": 64, "threshold": 0.8, "shingle": 5},
]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray of 2 CPUs for the module (what data.engine=ray finds initialised, and uses); its address."""
    ray = pytest.importorskip("ray", reason=RAY_REASON)
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for s, handler in before.items():  # ray.init's SIGTERM handler would exit a later test's process
            signal.signal(s, handler)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """Six files (one gzipped) of Austen's paragraphs, each repeating five paragraphs of the one before (exact
    duplicates across files) and one with a letter changed (a near duplicate)."""
    d = tmp_path_factory.mktemp("engine-inputs")
    paras = [p.strip() for p in read_file(EMBEDDED_CORPUS, split_paragraphs=True) if len(p.strip()) > 60][:240]
    for i in range(6):
        docs = paras[i * 40 : (i + 1) * 40]
        if i:
            prev = paras[(i - 1) * 40 : i * 40]
            docs = docs + prev[:5] + [prev[10][:-1] + "x"]
        body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs).encode()
        if i == 3:
            (d / f"part{i}.jsonl.gz").write_bytes(gzip.compress(body, mtime=0))
        else:
            (d / f"part{i}.jsonl").write_bytes(body)
    return d


def truncated_gz(cut: bool = True) -> bytes:
    """A .gz of 2,000 records cut in half: reading fails far past the bytes that finding the files sniffs."""
    full = gzip.compress("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(2000)).encode())
    return full[: len(full) // 2] if cut else full


def settings(paths: list[Path], **kw) -> CorpusSettings:
    base = {"paths": [str(p) for p in paths], "vocab_size": 400, "val_fraction": 0.1, "seed": 7, "cleaning": CLEANING}
    return CorpusSettings(**{**base, **kw})


def entry_bytes(corpus: PackedCorpus) -> dict[str, bytes]:
    """The entry's files (shards, token_counts.npy, tokenizer.json), byte for byte; meta.json and report.json are
    compared without what the build's time and place decide."""
    skip = ("meta.json", "report.json")
    return {p.name: p.read_bytes() for p in sorted(corpus.dir.iterdir()) if p.name not in skip}


def meta_content(corpus: PackedCorpus) -> dict:
    meta = json.loads((corpus.dir / "meta.json").read_text())
    meta.pop("meta_blake2b")
    meta["checksums"] = {f: c["blake2b"] for f, c in meta["checksums"].items()}  # not the shards' mtimes
    return meta


def report_content(corpus: PackedCorpus) -> dict:
    """report.json without timings and the processes counts (the engine's speed) and the engine setting."""
    report = json.loads((corpus.dir / "report.json").read_text())
    for key in ("timings", "seconds"):
        report.pop(key)
    for key in ("clean_processes", "encode_processes"):
        report["files"].pop(key)
    report["packing"].pop("encode_processes")
    report["settings"].pop("engine")
    return report


def test_ray_tasks_give_the_local_corpus_bitwise(ray_cluster, corpus_dir, tmp_path, monkeypatch):
    """Six files cleaned and encoded as Ray tasks on 2 workers: the shards, token counts, tokenizer, meta and report
    are those of the in-process build, exact dedup and near_dedup across files included. The Ray build's exact dedup
    goes through hash partitions (a 64-byte budget), the local one sorts in memory: the same documents drop."""
    local = prepare_corpus(settings([corpus_dir]), tmp_path / "local")
    monkeypatch.setattr(merge, "DEDUP_MEMORY_BYTES", 64)
    ray = prepare_corpus(settings([corpus_dir], engine="ray"), tmp_path / "ray")

    assert local.report["files"]["clean_processes"] == 1 and local.report["files"]["encode_processes"] == 1
    assert ray.report["files"] == {"files": 6, "cleaned": 6, "clean_processes": 2, "encoded": 6, "encode_processes": 2}
    assert ray.report["cache"]["key"] == local.report["cache"]["key"]  # the engine is in no cache key
    rules = local.report["rules"]
    assert rules["dedup"]["dropped"] == 25 and rules["near_dedup"]["dropped"] == 5  # across files, as one stream
    assert entry_bytes(ray) == entry_bytes(local)
    assert set(entry_bytes(ray)) >= {"tokenizer.json", "token_counts.npy", "train-00000.bin", "val-00000.bin"}
    assert meta_content(ray) == meta_content(local)
    assert report_content(ray) == report_content(local)
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(ray.tokens(split)), np.asarray(local.tokens(split)))
    assert ray_cluster and engine._started == [False]  # the module's Ray was used, not started (nor shut down)


def test_bad_file_is_the_same_one_line_error_under_ray(ray_cluster, corpus_dir, tmp_path):
    """A truncated .gz among good files (cut past what finding the files reads): the DataError the task raises
    comes back as itself, not a Ray traceback."""
    (tmp_path / "cut.jsonl.gz").write_bytes(truncated_gz())
    paths = [corpus_dir / "part0.jsonl", tmp_path / "cut.jsonl.gz", corpus_dir / "part1.jsonl"]
    with pytest.raises(DataError) as local:
        prepare_corpus(settings(paths), tmp_path / "local")
    with pytest.raises(DataError) as ray:
        prepare_corpus(settings(paths, engine="ray"), tmp_path / "ray")
    assert type(ray.value) is DataError and str(ray.value) == str(local.value)
    assert "_result" in [f.name for f in traceback.extract_tb(ray.value.__traceback__)]  # a Ray task's error
    assert (
        str(local.value) == f"{tmp_path / 'cut.jsonl.gz'}: cannot be read (truncated: the compressed stream ends early)"
    )


def start_prepare(argv: list[str], cwd: Path, env: dict[str, str], no_ray: bool = False) -> subprocess.Popen:
    """``python -m llm.prepare *argv`` as a user runs it; then, that it left no Ray connection or instance behind,
    nor Ray's SIGTERM handler (which would exit a training run on SIGTERM instead of saving it). ``no_ray``: as if
    Ray were not installed."""
    mine = "import signal\ndef mine(*_): pass\nsignal.signal(signal.SIGTERM, mine)"  # as a training run's handler
    before = "sys.modules['ray'] = None" if no_ray else mine
    after = (
        ""
        if no_ray
        else (
            "import ray\nassert not ray.is_initialized(), 'Ray left running'\n"
            "assert signal.getsignal(signal.SIGTERM) is mine, 'Ray SIGTERM handler left behind'"
        )
    )
    script = f"import sys\n{before}\nfrom llm.prepare import main\nrc = main(sys.argv[1:])\n{after}\nsys.exit(rc)\n"
    cmd = [sys.executable, "-c", script, *argv]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)``."""
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


TEXT = ["data=text", "data.paths=[in/]", "data.vocab_size=400", "data.cache_dir=cache"]  # relative: cwd is tmp_path


def test_prepare_with_ray_then_train_side_local_hits(corpus_dir, tmp_path, monkeypatch):
    """`python -m llm.prepare data.engine=ray` (its own local Ray, shut down when done; relative paths read from
    its working directory by the tasks), then the DataModule train.py builds, with data.engine=local: a hit."""
    pytest.importorskip("ray", reason=RAY_REASON)
    (tmp_path / "in").symlink_to(corpus_dir)
    rc, out, err = finish(start_prepare([*TEXT, "data.engine=ray"], tmp_path, _env()))
    assert rc == 0, err
    assert "cache: built" in out
    monkeypatch.chdir(tmp_path)
    dm = prepare.prepare([*TEXT, "data.engine=local"])
    assert isinstance(dm, PretrainDataModule) and dm.engine == "local"
    assert dm.report["cache"]["hit"] is True
    assert out.split("cache: built ")[1].split()[0] == dm.report["cache"]["key"]
    cpus = min(engine.available_cpus(), 6)  # the local Ray's CPUs (this machine's cores), at most one per file
    assert dm.report["files"]["clean_processes"] == cpus and dm.report["settings"]["engine"] == "ray"  # as built


def test_cluster_at_ray_address_and_a_bad_file_in_one_line(ray_cluster, tmp_path):
    """With RAY_ADDRESS, prepare runs its tasks on that cluster (this module's Ray), which it leaves running; a bad
    file there is one line on stderr, exit 2, as with the local engine."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(gzip.decompress(truncated_gz(cut=False)))
    (tmp_path / "in" / "cut.jsonl.gz").write_bytes(truncated_gz())
    on_ray = start_prepare([*TEXT, "data.engine=ray"], tmp_path, _env(RAY_ADDRESS=ray_cluster))
    local = start_prepare([*TEXT, "data.engine=local"], tmp_path, _env())
    (ray_rc, _, ray_err), (local_rc, _, local_err) = finish(on_ray), finish(local)
    assert ray_rc == 2 and local_rc == 2, ray_err
    line = "error: in/cut.jsonl.gz: cannot be read (truncated: the compressed stream ends early)"
    assert local_err.strip().splitlines() == [line]
    assert ray_err.strip().splitlines()[-1] == line and "Traceback" not in ray_err  # (after Ray's own log lines)
    assert "Connecting to existing Ray cluster" in ray_err  # Ray's line: the tasks ran on the module's Ray
    import ray

    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2  # the cluster is still up


def test_without_ray_the_engine_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as without the extra
    with pytest.raises(DataError, match=r'^data\.engine=ray needs Ray: pip install -e "\.\[ray\]"$'):
        PretrainDataModule(paths=[str(EMBEDDED_CORPUS)], engine="ray")
    with pytest.raises(DataError, match=r"data\.engine=ray needs Ray"):
        CorpusSettings(paths=[str(EMBEDDED_CORPUS)], engine="ray")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("some text " * 50)
    rc, out, err = finish(start_prepare([*TEXT, "data.engine=ray"], tmp_path, _env(), no_ray=True))
    assert rc == 2 and err.strip().splitlines() == [f"error: data: {RAY_REASON}"], err
    assert out == ""


@pytest.mark.parametrize("value", ["spark", "Ray"])
def test_bad_engine_is_one_line_naming_the_key_and_the_engines(value, capsys):
    with pytest.raises(DataError, match=rf"^data\.engine={value!r} is not an engine: expected one of local, ray$"):
        PretrainDataModule(paths=[str(EMBEDDED_CORPUS)], engine=value)
    assert prepare.main(["data=text", "data.paths=[x.txt]", f"data.engine={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: data: data.engine={value!r} is not an engine: expected one of local, ray"]
