"""MuonAdamW: which weights Muon gets, that its step is PyTorch's Muon and AdamW side by side, that its state
resumes exactly; and the z-loss term."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from llm.core import lora
from llm.core.config import ModelConfig
from llm.core.model import Transformer
from llm.errors import UserError
from llm.training.cross_entropy import IGNORE_INDEX, cross_entropy_and_z
from llm.training.muon import MUON_KEY, MuonAdamW
from llm.training.optim import param_groups, splits_matrices

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16, multiple_of=16)


def model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**CFG.to_dict(), **overrides}))


def names(m: torch.nn.Module, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in m.named_parameters() if id(p) in ids}


def loss_of(m: Transformer, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 64, (4, 16), generator=g)
    return torch.nn.functional.cross_entropy(m(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())


def train(m: Transformer, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        loss_of(m, step).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("tied", [True, False])
def test_muon_gets_the_blocks_matrices_and_adamw_the_rest(tied):
    m = model(tie_embeddings=tied)
    groups = param_groups(m, 0.1, split_matrices=True)
    assert groups[0][MUON_KEY] and not any(g.get(MUON_KEY) for g in groups[1:])
    muon = names(m, groups[0]["params"])
    assert muon == {n for n, p in m.layers.named_parameters(prefix="layers") if p.ndim == 2}
    assert len(muon) == 2 * 7  # wq wk wv wo w1 w2 w3 per block
    rest = names(m, groups[1]["params"]) | names(m, groups[2]["params"])
    assert "tok_embeddings.weight" in rest and all("norm" not in n for n in muon)
    assert ("output.weight" in names(m, groups[1]["params"])) == (not tied)  # an untied head: AdamW, decayed
    # without the split, AdamW's two groups are today's, in today's order (old checkpoints still resume)
    plain = param_groups(m, 0.1)
    assert [len(g["params"]) for g in plain] == [len(groups[0]["params"]) + len(groups[1]["params"]),
                                                 len(groups[2]["params"])]  # fmt: skip


def test_adapters_train_with_adamw():
    m = model()
    lora.apply(m, lora.LoRAConfig(rank=2))
    for n, p in m.named_parameters():
        p.requires_grad_(lora.is_adapter_key(n))
    groups = param_groups(m, 0.0, split_matrices=True)
    assert not groups[0]["params"]
    opt = MuonAdamW(groups)  # the empty Muon group is dropped, not refused
    assert len(opt.param_groups) == 1 and not opt.param_groups[0][MUON_KEY]


def test_a_step_is_pytorchs_muon_and_adamw_side_by_side():
    a, b = model(), model()
    groups = param_groups(a, 0.05, split_matrices=True)
    opt = MuonAdamW(groups, lr=0.02, adamw_lr=1e-3, weight_decay=0.05, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    ref = param_groups(b, 0.05, split_matrices=True)
    muon = torch.optim.Muon(ref[0]["params"], lr=0.02, weight_decay=0.05, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{k: v for k, v in g.items() if k != MUON_KEY} for g in ref[1:]], lr=1e-3,
                              betas=(0.9, 0.95))  # fmt: skip
    for step in range(3):
        loss_of(a, step).backward()
        opt.step()
        opt.zero_grad()
        loss_of(b, step).backward()
        muon.step()
        adamw.step()
        muon.zero_grad()
        adamw.zero_grad()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), model().parameters()))  # it moved


def test_state_dict_resumes_exactly_and_the_schedule_scales_both_rates():
    straight = model()
    opt = MuonAdamW(param_groups(straight, 0.1, split_matrices=True), lr=0.02, adamw_lr=2e-3)
    train(straight, opt, range(5))

    first = model()
    opt1 = MuonAdamW(param_groups(first, 0.1, split_matrices=True), lr=0.02, adamw_lr=2e-3)
    train(first, opt1, range(3))
    state = copy.deepcopy(opt1.state_dict())
    assert sum("momentum_buffer" in s for s in state["state"].values()) == 14  # Muon: one buffer per matrix
    assert sum("exp_avg_sq" in s for s in state["state"].values()) > 0  # AdamW: two moments
    resumed = model()
    resumed.load_state_dict(first.state_dict())
    opt2 = MuonAdamW(param_groups(resumed, 0.1, split_matrices=True), lr=0.02, adamw_lr=2e-3)
    opt2.load_state_dict(state)
    train(resumed, opt2, range(3, 5))
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n

    sched = torch.optim.lr_scheduler.LambdaLR(opt2, lambda step: 0.5)
    assert [g["lr"] for g in opt2.param_groups] == [0.01, 1e-3, 1e-3]
    del sched


def test_splits_matrices_only_for_muon():
    from functools import partial

    assert splits_matrices(partial(MuonAdamW, lr=0.1))
    assert not splits_matrices(partial(torch.optim.AdamW, lr=0.1))


def test_without_pytorchs_muon_it_says_which_version(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(UserError, match=r"optim=muon needs torch.optim.Muon \(PyTorch 2.9 or newer\)"):
        MuonAdamW(param_groups(model(), 0.0, split_matrices=True))


def test_z_loss_term_is_the_mean_squared_log_partition_over_labelled_tokens():
    logits = torch.randn(2, 3, 5) * 4
    labels = torch.tensor([[1, 2, IGNORE_INDEX], [IGNORE_INDEX, 0, 4]])
    keep = labels != IGNORE_INDEX
    ce, z = cross_entropy_and_z(logits, labels)
    torch.testing.assert_close(z, torch.logsumexp(logits[keep], dim=-1).square().mean())
    torch.testing.assert_close(ce, F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX))
    ce0, z0 = cross_entropy_and_z(logits, torch.full((2, 3), IGNORE_INDEX))
    assert ce0 == 0 and z0 == 0  # nothing labelled: 0, not NaN
    # shifting every logit of a position leaves cross-entropy as it is and changes the term
    ce10, z10 = cross_entropy_and_z(logits + 10, labels)
    torch.testing.assert_close(ce10, ce)
    assert z10 > z
    # the gradient of the term pushes log Z down: the same as autograd through a separate logsumexp
    x = logits.clone().requires_grad_()
    cross_entropy_and_z(x, labels)[1].backward()
    y = logits.clone().requires_grad_()
    torch.logsumexp(y[keep], dim=-1).square().mean().backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_the_planner_counts_one_muon_buffer_per_matrix_entry():
    from llm.core.memory import Plan, muon_params

    m = model(tie_embeddings=False)
    opt = MuonAdamW(param_groups(m, 0.1, split_matrices=True))
    train(m, opt, range(1))
    state_elements = sum(t.numel() for s in opt.state.values() for k, t in s.items() if k != "step")
    cfg = m.cfg
    assert state_elements == 2 * sum(p.numel() for p in m.parameters()) - muon_params(cfg)
    muon, adamw = Plan(cfg, seq_len=16, optimizer_kind="muon"), Plan(cfg, seq_len=16)
    assert muon.optimizer == 4 * state_elements and adamw.optimizer - muon.optimizer == 4 * muon_params(cfg)


def test_the_planner_counts_the_dense_segment_mask():
    from llm.core.memory import Plan

    cfg = model().cfg
    plain, masked = Plan(cfg, seq_len=16, micro_batch=3), Plan(cfg, seq_len=16, micro_batch=3, segment_mask=True)
    assert masked.activations - plain.activations == 3 * 16 * 16 * (4 + 2)  # 32-true: a float32 mask
