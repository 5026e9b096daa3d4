"""Adapter training: what the optimizer gets, what a checkpoint keeps, how it is read back and refused; NF4."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from llm.core import lora
from llm.errors import UserError
from llm.training import adapters, checkpoint
from llm.training.module import CausalLM, SequenceClassifier
from tests.conftest import debug_model

ADAPTER = lora.LoRAConfig(rank=4, targets=("wq", "wv", "w2")).to_dict()


def module(cls=CausalLM, **kw) -> CausalLM:
    optimizer = partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    m = cls(debug_model().to_dict(), optimizer=optimizer, adapter=ADAPTER, **kw)
    m.configure_model()
    return m


def test_the_optimizer_gets_the_adapters_only_and_a_step_changes_nothing_else():
    m = module()
    base = {k: v.clone() for k, v in m.model.state_dict().items() if not lora.is_adapter_key(k)}
    opt = m.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for group in opt.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in m.named_parameters() if lora.is_adapter_key(n)}
    for _ in range(2):  # B moves at step 1, then A gets a gradient too
        x = torch.randint(0, 256, (2, 16))
        m.loss(m(x), x.roll(-1, 1)).backward()
        opt.step()
        opt.zero_grad()
    after = m.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert all(after[k].abs().sum() > 0 for k in after if k.endswith("lora_b"))


def test_a_classifier_trains_its_head_and_adapters():
    m = module(SequenceClassifier, labels=["a", "b"])
    names = adapters.trainable_names(m)
    assert {"head.weight", "head.bias"} <= names and all(n.startswith("head.") or lora.is_adapter_key(n) for n in names)


def saved(m: CausalLM, base: dict[str, str] | None) -> dict:
    m.adapter_base = base
    ckpt = {"state_dict": m.state_dict(), "hyper_parameters": {"model": m.config.to_dict()}, "loops": {}}
    m.on_save_checkpoint(ckpt)
    return ckpt


def test_a_checkpoint_keeps_the_adapters_and_names_its_base(tmp_path):
    m = module()
    ckpt = saved(m, {"path": "/x/base.ckpt", "sha256": "ab" * 32})
    assert set(ckpt["state_dict"]) == adapters.trainable_names(m) and ckpt["adapter"]["base"]["path"] == "/x/base.ckpt"
    assert lora.LoRAConfig.from_dict(ckpt["adapter"]["config"]) == m.adapter
    assert not m.strict_loading  # the frozen base comes from init_from


def write_base_and_adapter(tmp_path):
    """A base checkpoint on disk and an adapter checkpoint (random B) trained 'on' it."""
    m = module()
    base_path = tmp_path / "base.ckpt"
    base_state = {f"model.{k}": v for k, v in m.model.state_dict().items() if not lora.is_adapter_key(k)}
    torch.save({"state_dict": base_state, "hyper_parameters": {"model": m.config.to_dict()}, "tokenizer": "T"}, base_path)
    with torch.no_grad():
        for _, layer in lora.layers(m.model):
            layer.lora_b.normal_(0, 0.05)
    ckpt = saved(m, {"path": str(base_path), "sha256": checkpoint.digest(base_path)})
    torch.save(ckpt, tmp_path / "adapter.ckpt")
    return m, base_path, tmp_path / "adapter.ckpt"


def test_reading_an_adapter_checkpoint_gives_the_whole_model(tmp_path):
    m, _, path = write_base_and_adapter(tmp_path)
    ckpt = checkpoint.load(path)
    assert ckpt["tokenizer"] == "T"  # the base's, carried along
    merged = checkpoint.model_state(ckpt, m.config, path)
    assert not any(lora.is_adapter_key(k) for k in merged)
    from llm.core.model import Transformer

    plain = Transformer(m.config)
    plain.load_state_dict(merged)
    x = torch.randint(0, 256, (2, 16))
    m.eval()
    torch.testing.assert_close(plain(x), m.model(x), atol=1e-5, rtol=1e-5)
    unmerged = checkpoint.model_state(ckpt, m.config, path, merge=False)
    assert {k for k in unmerged if lora.is_adapter_key(k)} == {k for k in m.model.state_dict() if lora.is_adapter_key(k)}


def test_a_missing_or_changed_base_is_refused_in_one_line(tmp_path):
    _, base_path, path = write_base_and_adapter(tmp_path)
    moved = tmp_path / "moved.ckpt"
    base_path.rename(moved)
    with pytest.raises(UserError, match="base checkpoint .* is not there") as err:
        checkpoint.load(path)
    assert "\n" not in str(err.value)
    assert "state_dict" in checkpoint.load(path, base=moved)  # given where it went
    ckpt = torch.load(moved, weights_only=False)
    ckpt["state_dict"]["model.norm.weight"] = ckpt["state_dict"]["model.norm.weight"] * 2
    torch.save(ckpt, moved)
    with pytest.raises(UserError, match="other contents"):
        checkpoint.load(path, base=moved)


def test_resume_refuses_other_adapters_another_base_or_a_full_checkpoint(tmp_path):
    m, base_path, path = write_base_and_adapter(tmp_path)
    ckpt = torch.load(path, weights_only=False)
    base = ckpt["adapter"]["base"]
    adapters.check_checkpoint(ckpt, m.adapter, base, "ckpt_path")  # the same: fine
    with pytest.raises(UserError, match="trained on .* resume with the base"):
        adapters.check_checkpoint(ckpt, m.adapter, {"path": "/other.ckpt", "sha256": "cd" * 32}, "ckpt_path")
    with pytest.raises(UserError, match="rank 4,.*this run asks rank 8"):
        adapters.check_checkpoint(ckpt, lora.LoRAConfig(rank=8, targets=("wq", "wv", "w2")), base, "ckpt_path")
    with pytest.raises(UserError, match="holds LoRA adapters; resume it with the same adapter="):
        adapters.check_checkpoint(ckpt, None, None, "ckpt_path")
    with pytest.raises(UserError, match="holds full weights, not adapters"):
        adapters.check_checkpoint(torch.load(base_path, weights_only=False), m.adapter, base, "ckpt_path")
    del ckpt["state_dict"]["model.layers.0.attention.wq.lora_a"]
    with pytest.raises(UserError, match="lacks adapter tensors"):
        m.on_load_checkpoint(ckpt)


def test_nf4_layer_computes_its_dequantized_base_plus_the_adapter():
    pytest.importorskip("bitsandbytes", reason="adapter=qlora needs bitsandbytes (pip install -e '.[qlora]')")
    from llm.training import quantize

    m = module()
    layer = m.model.layers[0].attention.wq
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.05)
    w = layer.weight.detach().clone()
    quantize.nf4(m.model, "cpu")  # bitsandbytes also quantizes on CPU: the layer is checked here, runs need CUDA
    assert isinstance(layer, quantize.NF4LoRALinear) and layer.weight.dtype == torch.uint8
    assert layer.weight.numel() == w.numel() // 2  # two 4-bit codes per byte
    deq = quantize.dequantized(layer)
    assert (deq - w).abs().mean() < 0.2 * w.abs().mean()  # a 4-bit approximation of the base
    layer.eval()  # no adapter dropout
    x = torch.randn(3, w.shape[1], requires_grad=True)
    y = layer(x)
    expected = x @ deq.t() + (x @ layer.lora_a.t()) @ layer.lora_b.t() * layer.scale
    torch.testing.assert_close(y, expected, atol=1e-2, rtol=1e-2)  # the base product runs in bf16
    y.sum().backward()
    assert layer.lora_a.grad is not None and layer.lora_b.grad is not None and x.grad is not None
    assert not layer.weight.requires_grad


def test_adapters_on_an_adapted_model_include_its_adapters_in_their_base(tmp_path):
    """DPO with LoRA from an SFT LoRA checkpoint: the second adapters' base is the first checkpoint, merged."""
    first, _, first_path = write_base_and_adapter(tmp_path)
    first.eval()
    second = module()
    second.load_weights(checkpoint.model_state(checkpoint.load(first_path), first.config, first_path))
    with torch.no_grad():
        for _, layer in lora.layers(second.model):
            layer.lora_b.normal_(0, 0.05)
    ckpt = saved(second, {"path": str(first_path), "sha256": checkpoint.digest(first_path)})
    torch.save(ckpt, tmp_path / "second.ckpt")
    second.eval()
    merged = checkpoint.model_state(checkpoint.load(tmp_path / "second.ckpt"), second.config, tmp_path / "second.ckpt")
    from llm.core.model import Transformer

    plain = Transformer(second.config)
    plain.load_state_dict(merged)
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(plain(x), second.model(x), atol=1e-5, rtol=1e-5)  # both adapters in
    with lora.disabled(second.model):
        assert not torch.allclose(plain(x), second.model(x), atol=1e-3)
