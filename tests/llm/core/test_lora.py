"""LoRA layers: the base untouched at the start, merged = adapted, disabled = base, names kept, meta-device init."""

from __future__ import annotations

import pytest
import torch

from llm.core import lora
from llm.core.model import Transformer
from llm.errors import UserError
from tests.conftest import debug_model


def adapted(seed: int = 0, **cfg) -> tuple[Transformer, Transformer]:
    """A base model and a copy of it with adapters whose B is random (so that the update is not zero)."""
    torch.manual_seed(seed)
    base = Transformer(debug_model())
    model = Transformer(debug_model())
    model.load_state_dict(base.state_dict())
    lora.apply(model, lora.LoRAConfig(**cfg))
    with torch.no_grad():
        for _, layer in lora.layers(model):
            layer.lora_b.normal_(0.0, 0.05)
    return base, model


def tokens(T: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(1))


def test_new_adapters_change_nothing_and_keep_every_base_name():
    torch.manual_seed(0)
    model = Transformer(debug_model())
    before, names = model(tokens()), set(model.state_dict())
    lora.apply(model, lora.LoRAConfig(rank=4))
    assert torch.equal(model(tokens()), before)  # B = 0
    added = set(model.state_dict()) - names
    assert names <= set(model.state_dict())  # the base keeps its names: checkpoints, FSDP, the converter
    assert added == {f"layers.{i}.{part}.{t}.{k}" for i in range(2) for t, part in lora.TARGETS.items()
                     for k in lora.ADAPTER_KEYS}  # fmt: skip


def test_only_adapters_train_and_their_count_is_rank_times_in_plus_out():
    _, model = adapted(rank=4, targets=["wq", "w2"])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(lora.is_adapter_key(n) for n in trainable)
    cfg = debug_model()
    per_block = 4 * (cfg.dim + cfg.n_heads * cfg.head_dim) + 4 * (cfg.ffn_dim + cfg.dim)
    assert sum(p.numel() for p in trainable.values()) == cfg.n_layers * per_block
    model(tokens()).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not lora.is_adapter_key(n))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


def test_merged_weights_compute_what_the_adapted_model_does():
    base, model = adapted(rank=4, alpha=8.0, dropout=0.1)
    model.eval()  # no dropout
    merged = Transformer(debug_model())
    merged.load_state_dict(lora.merge_state(model.state_dict(), scale=2.0))
    x = tokens()
    torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged(x), base(x), atol=1e-3)  # the update is really there


def test_disabled_adapters_compute_the_base_and_are_restored():
    base, model = adapted()
    x = tokens()
    with lora.disabled(model):
        assert torch.equal(model(x), base(x))
    assert not torch.allclose(model(x), base(x), atol=1e-3)
    assert lora.has_adapters(model) and not lora.has_adapters(base)


def test_the_seed_decides_the_initial_adapters():
    def first_a(seed: int) -> torch.Tensor:
        torch.manual_seed(123 + seed)  # the global RNG must not matter
        model = lora.apply(Transformer(debug_model()), lora.LoRAConfig(seed=seed))
        return model.layers[1].feed_forward.w3.lora_a.detach().clone()

    assert torch.equal(first_a(0), first_a(0)) and not torch.equal(first_a(0), first_a(1))


def test_meta_device_model_materialises_with_zero_b():
    with torch.device("meta"):
        model = lora.apply(Transformer(debug_model()), lora.LoRAConfig())
    model.to_empty(device="cpu")
    model.init_weights()  # reset_parameters of every module, as FSDP's materialisation does
    layer = model.layers[0].attention.wq
    assert layer.lora_b.abs().sum() == 0 and torch.isfinite(layer.lora_a).all() and layer.lora_a.std() > 0


@pytest.mark.parametrize(
    "bad, key",
    [({"rank": 0}, "adapter.rank"), ({"targets": ["wq", "qkv"]}, "adapter.targets"), ({"dropout": 1.0}, "dropout"),
     ({"quantize": "int8"}, "adapter.quantize"), ({"alpha": 0}, "adapter.alpha")],
)  # fmt: skip
def test_bad_settings_are_one_line_errors(bad, key):
    with pytest.raises(UserError, match=key) as err:
        lora.LoRAConfig(**bad)
    assert "\n" not in str(err.value)


def test_config_round_trips_through_a_dict():
    cfg = lora.LoRAConfig(rank=2, targets=["wv"], seed=3)
    assert lora.LoRAConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["targets"] == ["wv"]
