"""Packed SFT (data.packing): every example kept once, labels inside their example, positions restarting, padding
its own segment, and CausalLM's per-example loss on a packed batch equal to the unpacked one."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train
from datamodules.dataset import WindowSampler
from datamodules.sft import IGNORE_INDEX, PackCollate, SFTDataModule, inputs_and_labels, pack_examples
from datamodules.tokenizer import train_tokenizer
from llm.app.builders import build
from llm.app.schema import DATA_RUN_KEYS
from llm.core.model import Transformer
from llm.training.module import CausalLM
from tests.conftest import TINY, compose_config, debug_model

WORDS = "hello there my dear friend which novel is this from emma persuasion mansfield park a truth wife".split()


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer([" ".join(WORDS)] * 40, vocab_size=300).save(str(path))
    return path


def rows(n: int, seed: int = 0) -> list[dict]:
    """Instruction rows of varied lengths (about 15 to 60 tokens in all)."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [{"instruction": text(rng.randint(1, 8)), "response": text(rng.randint(1, 10))} for _ in range(n)]


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return path


def make_dm(tmp_path: Path, tokenizer_path: Path, packing: bool, **kw) -> SFTDataModule:
    train_file = write_jsonl(tmp_path / "train.jsonl", rows(60))
    val_file = write_jsonl(tmp_path / "val.jsonl", rows(25, seed=1))
    dm = SFTDataModule(
        paths=[str(train_file)],
        val_paths=[str(val_file)],
        tokenizer=str(tokenizer_path),
        seq_len=128,
        batch_size=4,
        packing=packing,
        **kw,
    )
    dm.prepare()
    return dm


def test_pack_examples_best_fit_decreasing():
    assert pack_examples([6, 4, 5, 5], 10) == [[0, 1], [2, 3]]  # 6+4 and 5+5: no room wasted
    rng = random.Random(3)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    packed = pack_examples(lengths, 64)
    assert sorted(i for row in packed for i in row) == list(range(500))  # every example, once
    assert all(sum(lengths[i] for i in row) <= 64 for row in packed)
    assert packed == pack_examples(lengths, 64)  # deterministic
    assert len(packed) <= 1.1 * sum(lengths) / 64 + 1  # close to the bound of full rows
    with pytest.raises(ValueError, match="not in"):
        pack_examples([65], 64)


def test_packing_keeps_every_example_and_restarts_positions(tmp_path, tokenizer_path):
    dm = make_dm(tmp_path, tokenizer_path, packing=True)
    for split, dataset in (("train", dm.train_dataset), ("val", dm.val_dataset)):
        n = len(dataset.examples)
        assert sorted(i for row in dataset.rows for i in row) == list(range(n))
        assert dm.report[split]["rows"] == len(dataset) < n and 0 <= dm.report[split]["padding"] < 1
    assert "packed into" in dm.summary()

    seen = 0
    for batch in dm.train_dataloader():  # the shuffled loader: rows, batch_size per batch
        assert set(batch) == {"input_ids", "labels", "positions", "segments"}
        assert len(batch["input_ids"]) <= dm.batch_size and batch["input_ids"].shape[1] <= dm.seq_len
        for b in range(len(batch["input_ids"])):
            segments, positions = batch["segments"][b], batch["positions"][b]
            pad = batch["input_ids"][b] == dm.pad_id
            real_ids = segments[~pad].unique()
            assert not set(segments[pad].tolist()) & set(real_ids.tolist())  # padding: a segment of its own
            assert (batch["labels"][b][pad] == IGNORE_INDEX).all()
            for s in real_ids:
                where = (segments == s).nonzero().flatten()
                assert (where == torch.arange(where[0], where[-1] + 1)).all()  # contiguous
                assert positions[where].tolist() == list(range(len(where)))  # restart at 0
            seen += len(real_ids)
    assert seen == len(dm.train_dataset.examples)


def test_labels_never_cross_an_example_boundary(tmp_path, tokenizer_path):
    dm = make_dm(tmp_path, tokenizer_path, packing=True)
    dataset = dm.train_dataset
    batch = PackCollate(dm.pad_id)([dataset[i] for i in range(len(dataset))])
    for b, row in enumerate(dataset.rows):
        at = 0
        for i in row:
            inputs, labels = inputs_and_labels(dataset.examples[i])
            n = len(inputs)
            assert batch["input_ids"][b, at : at + n].tolist() == inputs.tolist()
            assert batch["labels"][b, at : at + n].tolist() == labels.tolist()  # the example's own next tokens
            # the last input predicts this example's last token (EOS), never the next example's first (BOS)
            assert batch["labels"][b, at + n - 1] in (dataset.examples[i].ids[-1], IGNORE_INDEX)
            at += n


def test_rows_are_the_items_the_sampler_shards_over_ranks(tmp_path, tokenizer_path):
    dm = make_dm(tmp_path, tokenizer_path, packing=True)
    dataset = dm.train_dataset
    assert len(dm.train_dataloader().sampler) == len(dataset)  # the loader's order is over rows
    ranks = [list(WindowSampler(dataset, shuffle=True, seed=7, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(dataset) // 2 and not set(ranks[0]) & set(ranks[1])


def per_example_losses(module: CausalLM, batch: dict, spans: list[tuple[int, int, int, int]]) -> dict[int, float]:
    """Mean loss of each example's labelled tokens, by example index; spans: (example, row, start, end)."""
    logits = module(batch["input_ids"], batch.get("positions"), batch.get("segments"))
    per_token = F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=IGNORE_INDEX, reduction="none")
    out = {}
    for i, b, start, end in spans:
        labelled = batch["labels"][b, start:end] != IGNORE_INDEX
        out[i] = per_token[b, start:end][labelled].mean()
    return out


def test_causal_lm_loss_is_the_same_packed_or_not(tmp_path, tokenizer_path):
    padded, packed = (make_dm(tmp_path, tokenizer_path, packing=p) for p in (False, True))
    torch.manual_seed(0)
    module = CausalLM(debug_model(vocab_size=320, max_seq_len=128, init_std=0.1).to_dict())  # sharp attention
    module.configure_model()
    module.eval()
    examples = packed.val_dataset.examples
    assert [e.ids.tolist() for e in examples] == [e.ids.tolist() for e in padded.val_dataset.examples]
    with torch.no_grad():
        unpacked_batch = padded._collate()(examples)
        alone = per_example_losses(module, unpacked_batch, [(i, i, 0, len(e.ids) - 1) for i, e in enumerate(examples)])
        rows = packed.val_dataset.rows
        packed_batch = packed._collate()([packed.val_dataset[r] for r in range(len(rows))])
        spans = []
        for b, row in enumerate(rows):
            at = 0
            for i in row:
                spans.append((i, b, at, at + len(examples[i].ids) - 1))
                at += len(examples[i].ids) - 1
        together = per_example_losses(module, packed_batch, spans)
    assert set(together) == set(alone) == set(range(len(examples)))
    for i in alone:
        torch.testing.assert_close(together[i], alone[i], rtol=0, atol=1e-5)

    # validation: the same loss per token through the module's own metric, over each split's loader
    results = []
    for dm in (padded, packed):
        with torch.no_grad():
            for step, batch in enumerate(dm.val_dataloader()):
                module.validation_step(batch, step)
        results.append((float(module.val_loss.compute()), int(module.val_tokens.compute())))
        for metric in (module.val_loss, module.val_tokens):
            metric.reset()
    (padded_loss, padded_tokens), (packed_loss, packed_tokens) = results
    assert packed_tokens == padded_tokens and packed_loss == pytest.approx(padded_loss, abs=1e-5)


SFT_TINY = [o for o in TINY if not o.startswith("data.vocab_size")] + ["data.seq_len=64"]  # data=sft has no vocab_size


def test_config_packing_composes_and_a_finetune_step_runs(tmp_path, tokenizer_path):
    assert compose_config(["experiment=finetune"]).data.packing is True  # the default (conf/data/sft.yaml)
    data = write_jsonl(tmp_path / "train.jsonl", rows(40))
    overrides = ["data.packing=true", f"data.tokenizer={tokenizer_path}", f"data.paths=[{data}]"]
    cfg = compose_config(["experiment=finetune", *SFT_TINY, *overrides])
    dm = build(cfg.data, "data", drop=tuple(name for name, _, _ in DATA_RUN_KEYS))  # as the experiments build it
    dm.prepare()
    assert dm.packing and len(dm.train_dataset) < len(dm.train_dataset.examples)
    torch.manual_seed(0)
    module = CausalLM(debug_model(vocab_size=320).to_dict())
    module.configure_model()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    batch = next(iter(dm.train_dataloader()))
    losses = []
    for _ in range(3):
        loss = module.loss(module(batch["input_ids"], batch["positions"], batch["segments"]), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_tiny_packed_finetune_end_to_end(tmp_path, tokenizer_path):
    """train.py's finetune with data.packing=true, from a hand-made init_from checkpoint: it trains and validates."""
    tokenizer = tokenizer_path.read_text(encoding="utf-8")
    cfg = debug_model(vocab_size=320)
    torch.manual_seed(0)
    state = {f"model.{k}": v for k, v in Transformer(cfg).state_dict().items()}
    init = tmp_path / "init.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"model": cfg.to_dict()}, "tokenizer": tokenizer}, init)
    run = [o for o in SFT_TINY if not o.startswith("model.")]  # the shape comes from init_from
    data = write_jsonl(tmp_path / "train.jsonl", rows(80))
    overrides = ["experiment=finetune", f"init_from={init}", *run, "data.packing=true", f"data.paths=[{data}]"]
    loss = train.train(compose_config(overrides, run_dir=tmp_path / "ft"))
    report = json.loads((tmp_path / "ft" / "data_report.json").read_text())
    assert report["train"]["rows"] < report["train"]["examples"] and 0 < loss < 20
