"""DPO: the losses against hand computations, response log-probabilities, the reference policy (frozen copy or
adapters disabled), what a checkpoint holds, validation metrics; end to end through train.py (slow)."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from datamodules.preference import EMBEDDED_PREFERENCE
from llm.core import lora
from llm.core.model import Transformer
from llm.errors import UserError
from llm.training.dpo import PAIR_METRICS, PreferenceLM, check_settings, preference_loss, response_logps
from llm.training.module import IGNORE_INDEX
from tests.conftest import ROOT, TINY, compose_config, debug_model

CFG = debug_model(dim=32, ffn_dim=64, vocab_size=64, max_seq_len=32)

# log-probabilities of two pairs: policy chosen, policy rejected, reference chosen, reference rejected
PC, PR, RC, RR = [-3.0, -10.0], [-7.0, -4.0], [-4.0, -9.0], [-6.0, -3.0]


def deltas() -> list[float]:
    return [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]  # [2.0, 0.0]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def loss_of(beta: float, label_smoothing: float = 0.0, loss: str = "sigmoid", tokens=None) -> list[float]:
    t = {} if tokens is None else {"chosen_tokens": torch.tensor(tokens[0]), "rejected_tokens": torch.tensor(tokens[1])}
    chosen = torch.tensor(PC) - torch.tensor(RC)
    rejected = torch.tensor(PR) - torch.tensor(RR)
    return preference_loss(chosen, rejected, beta, label_smoothing, loss, **t).tolist()


def test_sigmoid_loss_by_hand():
    for beta in (0.1, 0.5):
        expected = [-log_sigmoid(beta * d) for d in deltas()]
        assert loss_of(beta) == pytest.approx(expected, rel=1e-6)
    assert loss_of(0.1)[1] == pytest.approx(math.log(2))  # delta 0: no preference yet


def test_label_smoothed_loss_by_hand():
    beta, ls = 0.5, 0.2
    expected = [-(1 - ls) * log_sigmoid(beta * d) - ls * log_sigmoid(-beta * d) for d in deltas()]
    assert loss_of(beta, ls) == pytest.approx(expected, rel=1e-6)


def test_ipo_loss_averages_over_the_answers_tokens():
    beta, tokens = 0.25, ([2, 5], [4, 1])
    expected = []
    for i in range(2):
        delta = (PC[i] - RC[i]) / tokens[0][i] - (PR[i] - RR[i]) / tokens[1][i]
        expected.append((delta - 1 / (2 * beta)) ** 2)
    assert loss_of(beta, loss="ipo", tokens=tokens) == pytest.approx(expected, rel=1e-6)


def test_settings_are_checked_in_one_line():
    check_settings(0.1, 0.0, "sigmoid")
    for args, match in [
        ((0.0, 0.0, "sigmoid"), r"dpo.beta=0.0 must be > 0"),
        ((0.1, 0.5, "sigmoid"), r"dpo.label_smoothing=0.5 must be in \[0, 0.5\)"),
        ((0.1, 0.1, "ipo"), r"applies to dpo.loss=sigmoid only"),
        ((0.1, 0.0, "hinge"), r"dpo.loss='hinge' must be one of sigmoid, ipo"),
    ]:
        with pytest.raises(UserError, match=match) as err:
            check_settings(*args)
        assert "\n" not in str(err.value)


def test_response_logps_sum_the_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    labels[2] = IGNORE_INDEX  # nothing labelled: 0
    total, count = response_logps(logits, labels)
    logp = torch.log_softmax(logits.double(), -1)
    for i in range(3):
        direct = sum(float(logp[i, t, labels[i, t]]) for t in range(6) if labels[i, t] != IGNORE_INDEX)
        assert float(total[i]) == pytest.approx(direct, abs=1e-5)
        assert int(count[i]) == int((labels[i] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------------- the module


def pairs(B: int = 3, T: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch as datamodules/preference.py makes it: a shared prompt, two answers, right padding."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(3, CFG.vocab_size, (B, T), generator=g)
        labels = ids.roll(-1, 1).clone()
        labels[:, :4] = IGNORE_INDEX  # the prompt
        labels[:, -2:] = IGNORE_INDEX  # padding
        batch[f"{side}_ids"], batch[f"{side}_labels"] = ids, labels
    return batch


def module(**kw) -> PreferenceLM:
    torch.manual_seed(0)
    m = PreferenceLM(CFG.to_dict(), **kw)
    m.configure_model()
    m.freeze_reference()  # the weights now are the init weights
    return m


def test_reference_equals_policy_at_step_zero():
    m = module()
    stats = m.pair_stats(pairs())
    assert torch.equal(stats.chosen_rewards, torch.zeros(3)) and torch.equal(stats.rejected_rewards, torch.zeros(3))
    torch.testing.assert_close(stats.loss, torch.full((3,), math.log(2)))
    per_pair = stats.per_pair()
    assert set(per_pair) == set(PAIR_METRICS) and float(per_pair["rewards/accuracies"].mean()) == 0.0  # ties


def test_reference_is_frozen_and_outside_the_state_dict():
    m = module(beta=0.5)
    reference = m.reference
    assert reference is not None and reference is not m.model and not reference.training
    assert all(not p.requires_grad for p in reference.parameters())
    assert not any(k.startswith("_reference") or "reference" in k for k in m.state_dict())
    ids = {id(p) for p in m.parameters()}
    assert not any(id(p) in ids for p in reference.parameters())  # not trained, not in the optimizer
    before = {k: v.clone() for k, v in reference.state_dict().items()}

    optimizer = torch.optim.SGD(m.parameters(), lr=1.0)
    m.train()
    m.pair_stats(pairs()).loss.mean().backward()
    optimizer.step()
    assert not reference.training  # train() on the module does not reach it
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    stats = m.pair_stats(pairs())
    assert not torch.equal(stats.chosen_rewards, torch.zeros(3))  # the policy moved, the reference did not

    m.double()  # moves and casts follow the module
    assert next(reference.parameters()).dtype == torch.float64


def test_checkpoint_holds_the_policy_only_and_loads_without_the_reference(tmp_path):
    m = module(beta=0.3, loss="ipo", reference="/somewhere/init.ckpt")
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert all(k.startswith(("model.",)) for k in ckpt["state_dict"] if "metric" not in k)
    hp = dict(m.hparams)
    assert (hp["beta"], hp["loss"], hp["reference"]) == (0.3, "ipo", "/somewhere/init.ckpt")
    restored = PreferenceLM(**hp)
    restored.configure_model()
    restored.load_state_dict(ckpt["state_dict"])  # strict: no reference keys asked for
    assert restored.reference is None and restored.loss_type == "ipo"


def test_validation_metrics_are_means_per_pair():
    m = module()
    m.model.output.weight.data.add_(0.05 * torch.randn_like(m.model.output.weight))  # rewards no longer 0
    batches = [pairs(3, seed=1), pairs(2, seed=2)]
    per_pair = [m.pair_stats(b) for b in batches]
    m.eval()
    for i, b in enumerate(batches):
        m.validation_step(b, i)
    results = m.validation_metrics()
    assert results["examples"] == 5
    for name in PAIR_METRICS:
        expected = torch.cat([s.per_pair()[name] for s in per_pair]).mean()
        assert results[name] == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert results["loss"] == pytest.approx(float(torch.cat([s.loss.detach() for s in per_pair]).mean()), rel=1e-5)
    margins = results["rewards/margins"]
    assert margins == pytest.approx(results["rewards/chosen"] - results["rewards/rejected"], abs=1e-6)


def test_a_joined_batch_is_the_same_pairs():
    m = module()
    batch = pairs()
    joined = {k: torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("ids", "labels")}
    joined = {"input_ids": joined["ids"], "labels": joined["labels"]}  # what datamodules/preference.py adds
    torch.testing.assert_close(m.pair_stats(joined).loss, m.pair_stats(batch).loss)


def test_with_adapters_the_reference_is_the_base_and_no_copy_is_made():
    adapter = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.0)
    m = module(adapter=adapter.to_dict())
    assert m.has_adapters() and m.reference is None  # no second copy of the weights
    base = Transformer(CFG)
    base.load_state_dict({k: v for k, v in m.model.state_dict().items() if not lora.is_adapter_key(k)}, strict=False)
    base.tie_weights()
    for _, layer in lora.layers(m.model):
        torch.nn.init.normal_(layer.lora_b, std=0.5)  # the adapters now change the policy
    ids = pairs()["chosen_ids"]
    with torch.no_grad():
        torch.testing.assert_close(m.reference_logits(ids), base(ids))
        assert not torch.allclose(m(ids), base(ids))
    assert all(layer.enabled for _, layer in lora.layers(m.model))  # enabled again after the reference's forward
    stats = m.pair_stats(pairs())
    assert not torch.equal(stats.chosen_rewards, torch.zeros(3))


def test_reference_needed_before_the_first_step():
    m = PreferenceLM(CFG.to_dict())
    m.configure_model()
    with pytest.raises(RuntimeError, match="freeze_reference"):
        m.pair_stats(pairs())


def test_dpo_keys_are_typed_at_compose_time():
    cfg = compose_config(["experiment=dpo"])
    assert cfg.task == "dpo" and cfg.data._target_.endswith("PreferenceDataModule") and cfg.dpo.beta == 0.1
    for override in ("dpo.bta=0.2", "dpo.beta=lots"):
        with pytest.raises(ConfigCompositionException):
            compose_config([override])


# ---------------------------------------------------------------------------------------------------- end to end

RUN = [o for o in TINY if not o.startswith(("model.", "data.", "callbacks.samples"))]  # trainer, sched settings
# a sample of the embedded pairs, trained on and measured: the debug model learns no held-out preference in
# seconds, but the rewards of the pairs it trains on must separate (at step 0 they are all 0: accuracy 0)
SAMPLE = 24
DPO = ["experiment=dpo", *RUN, "callbacks.samples=null", "data.seq_len=192", "data.batch_size=8", "optim.lr=3e-3",
       "sched.warmup_steps=4", "trainer.val_check_interval=8", "trainer.limit_val_batches=1.0"]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_cache) -> Path:
    run = tmp_path_factory.mktemp("pretrain")
    train.train(compose_config(TINY, run_dir=run, cache_dir=data_cache))
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    with gzip.open(EMBEDDED_PREFERENCE, "rt", encoding="utf-8") as f:
        rows = [next(f) for _ in range(SAMPLE)]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(rows), encoding="utf-8")
    return path


def run_experiment(overrides: list[str], run_dir: Path) -> float:
    return train.train(compose_config(overrides, run_dir=run_dir))


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.mark.slow
def test_dpo_learns_the_preferences_resumes_and_evaluates(pretrained, sample, tmp_path):
    data = [f"data.paths=[{sample}]", f"data.val_paths=[{sample}]"]
    run = tmp_path / "dpo"
    run_experiment([*DPO, f"init_from={pretrained}", *data, "trainer.max_steps=16"], run)

    acc = events(run)
    accuracy, loss = scalars(acc, "val/rewards/accuracies"), scalars(acc, "val/loss")
    assert accuracy[0] == 0.0 and loss[0] == pytest.approx(math.log(2), abs=1e-6)  # the reference is the policy
    assert accuracy[15] >= 0.9 and scalars(acc, "val/rewards/margins")[15] > 0.5  # measured: 1.0 and 3
    assert {"train/rewards/chosen", "train/logps/rejected", "perf/tokens_per_sec"} <= set(acc.Tags()["scalars"])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(k.startswith("model.") for k in ckpt["state_dict"])  # the reference's weights are not saved
    assert len(ckpt["state_dict"]) == len(torch.load(pretrained, weights_only=False)["state_dict"])
    assert (
        ckpt["hyper_parameters"]["reference"] == str(pretrained.resolve()) and ckpt["hyper_parameters"]["beta"] == 0.1
    )
    assert ckpt["chat_format"] == "<|{role}|>\n{content}\n"

    # resumed: the reference is init_from's weights again (not the resumed policy), as its final val/loss shows
    final = run_experiment([*DPO, f"init_from={pretrained}", *data, "trainer.max_steps=24", "ckpt_path=last"], run)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 24

    # eval of the best checkpoint: against the reference it names, the loss training's final validation had
    ev = tmp_path / "eval"
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    loss = run_experiment(["experiment=eval", f"init_from={best}", "data=preference", *data, "data.seq_len=192",
                           "trainer.accelerator=cpu"], ev)  # fmt: skip
    result = json.loads((ev / "eval.json").read_text())
    m = result["metrics"]
    assert result["kind"] == "preference" and result["reference"] == str(pretrained.resolve())
    assert m["rewards/accuracies"] >= 0.9 and m["rewards/margins"] > 0.5 and m["examples"] > 0
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(m)
    assert loss == pytest.approx(final, rel=1e-5) and m["loss"] == loss


def test_eval_of_a_model_without_a_reference_is_refused(pretrained, sample, tmp_path):
    overrides = ["experiment=eval", f"init_from={pretrained}", "data=preference", f"data.paths=[{sample}]"]
    with pytest.raises(UserError, match=r"names no reference policy \(not a DPO checkpoint\): give .* dpo.reference="):
        run_experiment([*overrides, "trainer.accelerator=cpu"], tmp_path / "eval")
    with pytest.raises(UserError, match="experiment=dpo trains on preference pairs: data=preference, not data=sft"):
        run_experiment(["experiment=dpo", f"init_from={pretrained}", "data=sft"], tmp_path / "dpo")
    with pytest.raises(UserError, match="data=preference is for experiment=dpo"):
        run_experiment(["experiment=finetune", f"init_from={pretrained}", "data=preference"], tmp_path / "ft")
    with pytest.raises(UserError, match=r"dpo.beta=-1.0 must be > 0"):
        run_experiment(["experiment=dpo", f"init_from={pretrained}", "dpo.beta=-1"], tmp_path / "dpo")


@pytest.mark.slow
def test_dpo_under_fsdp_shards_the_reference_and_resumes(pretrained, sample, tmp_path):
    """2 CPU processes: the frozen copy is sharded as the policy (step 0: rewards 0, loss log 2, as in one process),
    the sharded checkpoint holds no reference tensors, and resuming from it asks for none."""
    from torch.distributed.checkpoint import FileSystemReader

    run = tmp_path / "fsdp"
    fsdp = [*DPO, f"init_from={pretrained}", f"data.paths=[{sample}]", f"data.val_paths=[{sample}]",
            "trainer=fsdp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.precision=32-true",
            "data.batch_size=4", "trainer.val_check_interval=4", "callbacks.progress_bar=null",
            f"hydra.run.dir={run}"]  # fmt: skip

    def run_processes(*extra: str) -> subprocess.CompletedProcess:  # as a user types it: Lightning starts rank 1
        proc = subprocess.run(
            [sys.executable, "train.py", *fsdp, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    run_processes("trainer.max_steps=4")
    last = run / "checkpoints" / "last.ckpt"
    keys = list(FileSystemReader(str(last)).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("state_dict.")]
    assert model_keys and all(k.startswith("state_dict.model.") for k in model_keys)
    proc = run_processes("trainer.max_steps=8", "ckpt_path=last")
    assert "Restored all states" in proc.stdout + proc.stderr
    acc = events(run)
    loss, accuracy = scalars(acc, "val/loss"), scalars(acc, "val/rewards/accuracies")
    assert loss[0] == pytest.approx(math.log(2), abs=1e-6) and accuracy[0] == 0.0
    assert accuracy[7] >= 0.75 and loss[7] < loss[3] < math.log(2)  # still learning after the resume
