"""The pretraining DataModule: batches, artefacts, the sampler (determinism, resume, DDP shards), errors."""

from __future__ import annotations

import gzip
import inspect
import json
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from datamodules.cleaning import DEFAULT_RULES, Cleaner
from datamodules.dataset import TokenWindows, WindowSampler
from datamodules.pretrain import PretrainDataModule
from datamodules.sources import EMBEDDED_CORPUS, DataError, read_file

SMALL = {"seq_len": 32, "batch_size": 4, "vocab_size": 512}
ROOT = Path(__file__).resolve().parents[2]
CONF_DATA = ROOT / "conf" / "data"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def corpus_dm(cache) -> PretrainDataModule:
    """The embedded corpus as conf/data/corpus.yaml sets it up (paragraph documents), small vocab."""
    dm = PretrainDataModule(split_paragraphs=True, cache_dir=str(cache), **SMALL)
    dm.prepare()
    return dm


@pytest.fixture(scope="module")
def small_src(tmp_path_factory) -> Path:
    """~300 paragraphs of Emma as a .txt file: quick to prepare."""
    paras = [p for _, p in zip(range(300), read_file(EMBEDDED_CORPUS, split_paragraphs=True))]
    path = tmp_path_factory.mktemp("src") / "emma.txt"
    path.write_text("\n".join(paras), encoding="utf-8")
    return path


def small_dm(src: Path, cache: Path, **kw) -> PretrainDataModule:
    args = {"paths": [str(src)], "split_paragraphs": True, "cache_dir": str(cache), "val_fraction": 0.1, **SMALL}
    return PretrainDataModule(**{**args, **kw})


def test_embedded_corpus_batches(corpus_dm):
    dm = corpus_dm
    assert dm.vocab_size == dm.tokenizer.get_vocab_size() == 512
    assert (dm.bos_id, dm.eos_id, dm.pad_id) == (0, 1, 2)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels"}
    for t in batch.values():
        assert t.shape == (4, 32) and t.dtype == torch.long
    assert (batch["input_ids"][:, 1:] == batch["labels"][:, :-1]).all()
    assert int(batch["input_ids"].max()) < dm.vocab_size
    rep = dm.report
    assert rep["documents"]["read"] > 10_000 and rep["documents"]["kept"] > 9_000
    assert rep["tokens"]["train"] > 900_000 and rep["tokens"]["val"] > 40_000
    assert {
        "sources",
        "characters",
        "rules",
        "invalid_utf8_replacements",
        "skipped_files",
        "tokenizer",
        "cache",
        "seconds",
    } <= set(rep)


def test_windows_cover_the_stream(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(11, dtype=np.uint16).tofile(path)
    ds = TokenWindows(path, "uint16", 11, seq_len=3)
    assert len(ds) == 3  # windows of 4 tokens starting at 0, 3, 6 (the last would need token 12)
    assert ds[1]["input_ids"].tolist() == [3, 4, 5] and ds[1]["labels"].tolist() == [4, 5, 6]
    labels = torch.cat([ds[i]["labels"] for i in range(len(ds))]).tolist()
    assert labels == list(range(1, 10))  # every token a label once


def test_warm_prepare_is_fast_and_a_hit(corpus_dm, cache):
    t0 = time.perf_counter()
    dm = PretrainDataModule(split_paragraphs=True, cache_dir=str(cache), **SMALL)
    dm.prepare()
    dm.prepare()  # idempotent
    assert time.perf_counter() - t0 < 1.0
    assert dm.report["cache"]["hit"] is True and dm.report["tokens"] == corpus_dm.report["tokens"]


def test_seq_len_is_not_part_of_the_cache(corpus_dm, cache):
    dm = PretrainDataModule(split_paragraphs=True, cache_dir=str(cache), **{**SMALL, "seq_len": 64})
    dm.prepare()
    assert dm.report["cache"]["hit"] is True
    assert next(iter(dm.val_dataloader()))["input_ids"].shape == (4, 64)


def test_save_artifacts(corpus_dm, tmp_path):
    corpus_dm.save_artifacts(tmp_path / "run")
    tok = Tokenizer.from_file(str(tmp_path / "run" / "tokenizer.json"))
    assert tok.get_vocab_size() == corpus_dm.vocab_size
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["tokens"] == corpus_dm.report["tokens"]


def test_val_is_fixed_and_in_order(corpus_dm):
    a = [b["input_ids"] for b in corpus_dm.val_dataloader()]
    b = [b["input_ids"] for b in corpus_dm.val_dataloader()]
    assert all((x == y).all() for x, y in zip(a, b))
    ds = corpus_dm.val_dataset
    assert (a[0][1] == ds[1]["input_ids"]).all()
    assert sum(len(x) for x in a) == len(ds)


# ---------------------------------------------------------------------------------------------------------
# sampler


class _Len(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def test_sampler_deterministic_per_seed_and_epoch():
    ds = _Len(100)
    a = list(WindowSampler(ds, seed=1))
    assert a == list(WindowSampler(ds, seed=1)) and sorted(a) == list(range(100)) and a != list(range(100))
    assert a != list(WindowSampler(ds, seed=2))
    s = WindowSampler(ds, seed=1)
    s.set_epoch(1)
    assert list(s) != a and sorted(s) == list(range(100))
    assert list(WindowSampler(ds, shuffle=False)) == list(range(100))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_resume_from_state_dict(world):
    ds = _Len(101)
    full = [list(WindowSampler(ds, seed=5, rank=r, world_size=world)) for r in range(world)]
    samplers = [WindowSampler(ds, seed=5, rank=r, world_size=world) for r in range(world)]
    its = [iter(s) for s in samplers]
    head = [[next(it) for _ in range(7)] for it in its]
    states = [s.state_dict() for s in samplers]
    assert all(st == {"seed": 5, "epoch": 0, "position": 7 * world} for st in states)
    for r in range(world):
        resumed = WindowSampler(ds, seed=5, rank=r, world_size=world)
        resumed.load_state_dict(states[r])
        resumed.set_epoch(0)  # what Lightning does at the start of the resumed epoch
        rest = list(resumed)
        assert head[r] + rest == full[r]
        assert len(resumed) == len(full[r])  # the epoch's length stays whole
        assert list(resumed) == full[r]  # the next iteration starts from the beginning again


def test_resume_with_another_world_size_continues_the_order():
    ds = _Len(60)
    one = WindowSampler(ds, seed=3)
    order = list(one)
    it = iter(WindowSampler(ds, seed=3))
    _ = [next(it) for _ in range(10)]
    state = {"seed": 3, "epoch": 0, "position": 10}
    rest = []
    for r in range(2):
        s = WindowSampler(ds, seed=3, rank=r, world_size=2)
        s.load_state_dict(state)
        rest.append(list(s))
    assert sorted(rest[0] + rest[1]) == sorted(order[10:])


@pytest.mark.parametrize("n, world", [(100, 2), (101, 2), (50, 4)])
def test_ddp_shards_are_disjoint_and_cover(n, world):
    ds = _Len(n)
    for shuffle in (True, False):
        shards = [list(WindowSampler(ds, shuffle=shuffle, seed=9, rank=r, world_size=world)) for r in range(world)]
        assert all(len(s) == n // world for s in shards)  # equal lengths: no rank waits at the end
        flat = [i for s in shards for i in s]
        assert len(set(flat)) == len(flat) == n - n % world
        order = WindowSampler(ds, shuffle=shuffle, seed=9).order(0)
        assert set(flat) == set(order[: n - n % world].tolist())


def test_datamodule_shards_by_trainer_rank_and_world(corpus_dm, monkeypatch):
    class FakeTrainer:
        def __init__(self, rank: int) -> None:
            self.global_rank, self.world_size = rank, 2

    seen = []
    for rank in range(2):
        monkeypatch.setattr(corpus_dm, "trainer", FakeTrainer(rank))
        seen.append(list(corpus_dm.train_dataloader().sampler))
    monkeypatch.undo()
    assert corpus_dm.trainer is None
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) == len(seen[1]) == len(corpus_dm.train_dataset) // 2


def test_tensor_parallel_ranks_read_the_same_batches(corpus_dm, monkeypatch):
    class TensorParallel:  # 2 processes, one data-parallel replica (as ModelParallelStrategy reports it)
        distributed_sampler_kwargs = {"num_replicas": 1, "rank": 0}

    class FakeTrainer:
        def __init__(self, rank: int) -> None:
            self.global_rank, self.world_size, self.strategy = rank, 2, TensorParallel()

    seen = []
    for rank in range(2):
        monkeypatch.setattr(corpus_dm, "trainer", FakeTrainer(rank))
        seen.append(list(corpus_dm.train_dataloader().sampler))
    assert seen[0] == seen[1] and len(seen[0]) == len(corpus_dm.train_dataset)


@pytest.mark.parametrize("document_mask", [False, True])
def test_datamodule_state_dict_resumes_batches(small_src, tmp_path, document_mask):
    dm = small_dm(small_src, tmp_path, document_mask=document_mask)
    dm.prepare()
    reference = list(dm.train_dataloader())
    it = iter(dm.train_dataloader())
    for _ in range(3):
        next(it)
    state = dm.state_dict()
    assert state["position"] == 3 * 4 and state["epoch"] == 0

    dm2 = small_dm(small_src, tmp_path, document_mask=document_mask)
    dm2.load_state_dict(state)  # Lightning restores before asking for the dataloader
    dm2.prepare()
    rest = list(dm2.train_dataloader())
    assert len(rest) == len(reference) - 3
    keys = {"input_ids", "labels"} | ({"segments", "positions"} if document_mask else set())
    for a, b in zip(rest, reference[3:]):
        assert set(a) == set(b) == keys and all(torch.equal(a[k], b[k]) for k in keys)


# ---------------------------------------------------------------------------------------------------------
# Lightning: the position saved in a mid-epoch checkpoint resumes the exact batches


class _Recorder(L.LightningModule):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"][:, 0].tolist())
        logits = self.head(self.emb(batch["input_ids"]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(dm: PretrainDataModule, root: Path, max_steps: int, ckpt_path: str | None = None) -> _Recorder:
    dm.prepare()
    model = _Recorder(dm.vocab_size)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ckpt],
        default_root_dir=root,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def test_lightning_resume_mid_epoch(small_src, tmp_path, recwarn):
    ref = _fit(small_dm(small_src, tmp_path / "cache"), tmp_path / "a", max_steps=10)
    assert len(ref.seen) == 10
    saved = torch.load(tmp_path / "a" / "step=4.ckpt", weights_only=False)
    assert saved["PretrainDataModule"] == {"seed": 1234, "epoch": 0, "position": 16, "batch_samples": 4}
    resumed = _fit(small_dm(small_src, tmp_path / "cache"), tmp_path / "b", 10, str(tmp_path / "a" / "step=4.ckpt"))
    assert resumed.seen == ref.seen[4:]
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


@pytest.mark.parametrize("name", ["corpus", "text"])
def test_data_configs_name_every_argument_and_valid_rules(name):
    cfg = OmegaConf.load(CONF_DATA / f"{name}.yaml")
    assert cfg._target_ == "datamodules.pretrain.PretrainDataModule"
    params = set(inspect.signature(PretrainDataModule.__init__).parameters) - {"self"}
    run_keys = {"global_batch_size"}  # read by the run (gradient accumulation), not passed to the DataModule
    assert set(cfg) - {"defaults", "_target_"} == params | run_keys and not params & run_keys
    assert cfg.cache_dir == ".cache/data" and OmegaConf.to_container(cfg)["seed"] == "${seed}"
    rules = OmegaConf.to_container(cfg.cleaning)
    assert [r["name"] for r in rules] == [r["name"] for r in DEFAULT_RULES]
    Cleaner(rules)  # every rule and parameter exists


# ---------------------------------------------------------------------------------------------------------
# errors


def test_val_smaller_than_a_window(small_src, tmp_path):
    dm = small_dm(small_src, tmp_path, val_fraction=0.004, seq_len=512)  # one paragraph of val
    with pytest.raises(ValueError, match=r"data\.val_fraction=0\.004 leaves \d+ validation tokens") as e:
        dm.prepare()
    assert "\n" not in str(e.value)


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        PretrainDataModule(paths=[str(tmp_path / "nope.jsonl")], cache_dir=str(tmp_path)).prepare()


def test_wrong_text_field(small_src, tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"body": "x" * 100}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: no key data\.text_field='text'"):
        PretrainDataModule(paths=[str(src)], cache_dir=str(tmp_path)).prepare()


@pytest.mark.parametrize(
    "kw, match", [({"paths": []}, "data.paths is empty"), ({"batch_size": 0}, "data.batch_size=0")]
)
def test_bad_arguments(kw, match):
    with pytest.raises(DataError, match=match):
        PretrainDataModule(**kw)


# ---------------------------------------------------------------------------------------------------------
# real corpora, as users have them: mixed scripts, encodings, line endings, compression, and junk

SANGUO = Path(__file__).resolve().parents[1] / "data" / "sanguo_yanyi_sample.jsonl"  # six chapters, see tests/data


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory) -> Path:
    """English and Chinese text with byte-order marks, CRLF, invalid bytes, empty files, gzip, UTF-16, junk."""
    if not SANGUO.is_file():
        pytest.skip(f"{SANGUO} not available")
    with open(SANGUO, encoding="utf-8") as f:
        chapters = [json.loads(line)["text"] for _, line in zip(range(4), f)]
    paras = [p for _, p in zip(range(400), read_file(EMBEDDED_CORPUS, split_paragraphs=True))]
    d = tmp_path_factory.mktemp("mixed")
    (d / "en").mkdir()
    (d / "zh").mkdir()
    (d / "junk").mkdir()
    bom = b"\xef\xbb\xbf"
    records = "".join(json.dumps({"text": p}) + "\n" for p in paras[:200])
    (d / "en" / "emma.jsonl").write_bytes(bom + records.encode())
    crlf = "\n\n".join(paras[200:350]).replace("\n", "\r\n")
    (d / "en" / "emma-windows.txt.gz").write_bytes(gzip.compress(crlf.encode()))
    latin1 = "\n\n".join(p.replace("e", "é") for p in paras[350:]).encode("latin-1", "replace")
    (d / "en" / "latin1.txt").write_bytes(latin1)
    (d / "zh" / "ch1.txt").write_bytes(bom + chapters[0].replace("\n", "\r\n").encode())
    zh_records = "".join(json.dumps({"text": c}, ensure_ascii=False) + "\n" for c in chapters[1:3])
    (d / "zh" / "ch2-3.jsonl.gz").write_bytes(gzip.compress(zh_records.encode()))
    (d / "zh" / "ch4-notepad.txt").write_bytes(chapters[3].replace("\n", "\r\n").encode("utf-16"))
    (d / "empty.txt").write_bytes(b"")
    (d / "zh" / "empty.jsonl.gz").write_bytes(gzip.compress(b""))
    (d / "junk" / "photo.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (d / "README.md").write_text("not a corpus file")
    return d


def test_mixed_real_corpora(mixed_dir, tmp_path):
    dm = PretrainDataModule(
        paths=[str(mixed_dir)], split_paragraphs=True, cache_dir=str(tmp_path), val_fraction=0.1, **SMALL
    )
    dm.prepare()
    rep = dm.report
    assert rep["sources"]["files"] == 8 and rep["sources"]["empty_files"] == 2
    skipped = {Path(s["path"]).name: s["reason"] for s in rep["skipped_files"]}
    assert skipped == {"README.md": "unsupported file type", "photo.txt": "binary file (NUL bytes)"}
    assert rep["sources"]["skipped_files"] == 2
    assert rep["invalid_utf8_replacements"] > 50  # the Latin-1 é
    assert rep["documents"]["read"] > 400 and rep["documents"]["kept"] > 350
    assert rep["rules"]["whitespace"]["changed"] > 150  # the CRLF documents, at least
    assert rep["tokens"]["train"] > 10_000 and rep["tokens"]["val"] > 1000

    text = dm.tokenizer.decode(np.asarray(dm.corpus.tokens("train")).tolist() + [0])
    text += dm.tokenizer.decode(np.asarray(dm.corpus.tokens("val")).tolist())
    assert "\r" not in text and "\ufeff" not in text and "\x00" not in text
    assert "滚滚长江东逝水" in text  # the BOM+CRLF chapter
    assert "Emma Woodhouse, handsome, clever, and rich" in text  # the BOM'd jsonl
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32)
    dm.save_artifacts(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "data_report.json").read_text(encoding="utf-8"))
    assert saved["sources"] == rep["sources"]


def test_train_py_truncated_gzip_one_line_error_no_cache(tmp_path):
    """As a user sees it: exit code 2, one `error:` line naming the file, no traceback, nothing cached."""
    body = "".join(json.dumps({"text": f"Paragraph {i}: " + "some words " * 30}) + "\n" for i in range(3000))
    full = gzip.compress(body.encode())
    bad = tmp_path / "data" / "part.jsonl.gz"
    bad.parent.mkdir()
    bad.write_bytes(full[: len(full) * 2 // 3])
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "data=text",
            f"data.paths=[{bad.parent}]",
            f"data.cache_dir={cache}",
            "trainer.max_steps=2",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}: cannot be read (truncated: the compressed stream ends early)"]
    assert sorted(p.name for p in cache.iterdir()) == [".lock", "files"]
    assert not list((cache / "files").iterdir())  # no entry of the bad file, complete or not


def test_worker_processes_load_the_same_batches(small_src, tmp_path):
    """DataLoader workers (which re-open the memory maps) give the batches of the main process, in order."""
    dm = small_dm(small_src, tmp_path)
    dm.prepare()
    main = [b["input_ids"] for _, b in zip(range(5), dm.train_dataloader())]
    dm_workers = small_dm(small_src, tmp_path, num_workers=2)
    dm_workers.prepare()
    loader = dm_workers.train_dataloader()
    assert loader.num_workers == 2 and loader.pin_memory is torch.cuda.is_available()
    it = iter(loader)
    workers = [next(it)["input_ids"] for _ in range(5)]
    it._shutdown_workers()  # now: persistent workers left prefetching stall whichever test collects them
    assert all(torch.equal(a, b) for a, b in zip(main, workers))


# ---------------------------------------------------------------------------------------------------------
# data.val_paths: a held-out set, evaluated whole


def test_val_tail_window_is_padded_and_ignored(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(11, dtype=np.uint16).tofile(path)
    ds = TokenWindows(path, "uint16", 11, seq_len=3, tail=True, pad_id=99)
    assert len(ds) == 4  # windows at 0, 3, 6, and the tail at 9 (tokens 9, 10)
    assert ds[3]["input_ids"].tolist() == [9, 99, 99] and ds[3]["labels"].tolist() == [10, -100, -100]
    labels = torch.cat([ds[i]["labels"] for i in range(len(ds))])
    assert labels[labels != -100].tolist() == list(range(1, 11))  # every token but the first a label once
    assert len(TokenWindows(path, "uint16", 10, seq_len=3, tail=True)) == 3  # no tail when the windows fit


def _held_out(tmp_path: Path) -> tuple[Path, Path]:
    paras = [p for _, p in zip(range(400), read_file(EMBEDDED_CORPUS, split_paragraphs=True))]
    train, held = tmp_path / "train.txt", tmp_path / "held.txt"
    train.write_text("\n\n".join(paras[:300]), encoding="utf-8")
    held.write_text("\n\n".join(paras[300:]), encoding="utf-8")
    return train, held


@pytest.mark.parametrize("world", [1, 2])
def test_val_paths_evaluated_whole_over_ranks(tmp_path, monkeypatch, world):
    train, held = _held_out(tmp_path)
    dm = small_dm(train, tmp_path / "cache", val_paths=[str(held)])
    dm.prepare()
    dm.tokenizer.save(str(tmp_path / "tok.json"))
    whole = small_dm(train, tmp_path / "cache", val_fraction=0.5, tokenizer=str(tmp_path / "tok.json"))
    whole.prepare()  # (data.paths split in two, with the same tokenizer: what it holds in all)
    rep = dm.report
    assert rep["split"]["train_documents"] == whole.report["documents"]["kept"] == rep["documents"]["kept"]
    assert rep["split"]["val_documents"] == rep["val"]["documents"]["kept"] > 50
    assert rep["split"]["val_split"] == "data.val_paths" and rep["split"]["val_in_train"] == 0
    assert rep["tokens"]["train"] == sum(whole.report["tokens"].values())  # nothing of data.paths held out
    n_val = rep["tokens"]["val"]
    assert (n_val - 1) % dm.seq_len != 0  # (a tail window)

    class FakeTrainer:
        def __init__(self, rank: int) -> None:
            self.global_rank, self.world_size = rank, world

    per_rank = []
    for rank in range(world):
        monkeypatch.setattr(dm, "trainer", FakeTrainer(rank))
        batches = list(dm.val_dataloader())
        assert all(b["labels"].shape == b["input_ids"].shape == (dm.batch_size, dm.seq_len) for b in batches[:-1])
        per_rank.append(torch.cat([b["labels"] for b in batches]))
    monkeypatch.undo()
    assert len({len(w) for w in per_rank}) == 1  # every rank runs as many windows (a sharded model needs it)
    # rank r has windows r, r + world, ...: interleaved, they are the stream's labels, each once
    windows = torch.stack(per_rank, 1).flatten(0, 1)
    labels = windows[windows != -100]
    stream = torch.from_numpy(np.asarray(dm.corpus.tokens("val")).astype(np.int64))
    assert len(labels) == n_val - 1 and (labels == stream[1:]).all()


def test_val_paths_tokenizer_and_eval_only(tmp_path):
    train, held = _held_out(tmp_path)
    dm = small_dm(train, tmp_path / "cache", val_paths=[str(held)])
    dm.prepare()
    held_bytes = held.read_text(encoding="utf-8").encode()
    assert dm.report["tokenizer"]["trained_on_bytes"] < len(train.read_bytes())  # data.paths alone
    assert dm.report["val"]["sources"]["bytes"] == len(held_bytes)
    tok = tmp_path / "tok.json"
    dm.tokenizer.save(str(tok))
    # evaluation only: data.paths is not read (it may not even exist), no train split is needed
    ev = small_dm(tmp_path / "gone.txt", tmp_path / "cache", val_paths=[str(held)], tokenizer=str(tok), train=False)
    ev.prepare()
    assert ev.report["tokens"] == {"train": 0, "val": dm.report["tokens"]["val"]}
    assert len(ev.val_dataset) == len(dm.val_dataset)
    with pytest.raises(DataError, match=r"data\.train=false") as e:
        ev.train_dataloader()
    assert "\n" not in str(e.value)
    # training with too little in data.paths is refused, naming the setting
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("A single short paragraph, long enough to be kept by the cleaning rules.", encoding="utf-8")
    with pytest.raises(DataError, match=r"only \d+ training tokens in data\.paths") as e:
        small_dm(tiny, tmp_path / "cache", val_paths=[str(held)], tokenizer=str(tok), seq_len=512).prepare()
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="data.val_paths is empty"):
        PretrainDataModule(val_paths=[])


def test_eval_of_a_text_file_whole(tmp_path, data_cache):
    """`experiment=eval data=text data.paths=[held_out.txt]`: the file is the val split, measured whole."""
    import train as train_py
    from tests.conftest import TINY, compose_config

    run = tmp_path / "pretrain"
    train_py.train(compose_config(TINY, run_dir=run, cache_dir=data_cache))
    ckpt = run / "checkpoints" / "last.ckpt"
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be " * 3
    held = tmp_path / "held_out.txt"
    held.write_text(text.strip(), encoding="utf-8")  # one document, already clean
    ev = tmp_path / "eval"
    overrides = ["experiment=eval", f"init_from={ckpt}", "data=text", f"data.paths=[{held}]", "data.seq_len=32"]
    train_py.train(compose_config([*overrides, "data.batch_size=4", "trainer.accelerator=cpu"], run_dir=ev))
    result = json.loads((ev / "eval.json").read_text())
    tok = Tokenizer.from_file(str(ev / "tokenizer.json"))
    n_tokens = len(tok.encode(text.strip(), add_special_tokens=False).ids) + 2  # BOS document EOS
    assert n_tokens > 3 * 33  # several windows and a tail
    assert result["data"]["tokens"] == n_tokens
    assert result["metrics"]["tokens"] == n_tokens - 1  # every token but the first predicted, once
    report = json.loads((ev / "data_report.json").read_text())
    assert report["split"]["val_split"] == "data.val_paths" and report["tokens"]["train"] == 0
