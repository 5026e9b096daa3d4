"""Exporting LoRA adapter checkpoints: merged (to-hf, merge) and as PEFT adapters, checked against transformers and
peft themselves. The adapters' B matrices are random, not zero, so that a merge that drops them cannot pass."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from datamodules.tokenizer import train_tokenizer
from llm import convert
from llm.core import lora
from llm.core.config import ModelConfig
from llm.core.model import Transformer
from llm.training import checkpoint
from tests.conftest import TINY, compose_config, debug_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TEXT = ["It is a truth universally acknowledged, that a single man in possession of a good fortune."] * 20
CHAT_TEMPLATE = "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
CASES = {  # model shape, adapter
    "all-tied-gqa": (dict(tie_embeddings=True), lora.LoRAConfig(rank=8, alpha=16.0)),
    "some-untied-mha": (dict(n_kv_heads=None), lora.LoRAConfig(rank=4, alpha=6.0, targets=("wq", "wv", "w2"))),
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT, vocab_size=300)


def make_base(path, cfg: ModelConfig, tokenizer, seed=0) -> Transformer:
    """A full checkpoint shaped like Lightning's (norms randomised so that no weight is left at its init)."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    ckpt = {"state_dict": state, "hyper_parameters": {"model": cfg.to_dict()}, "tokenizer": tokenizer.to_str()}
    torch.save({**ckpt, "optimizer_states": [], "loops": {}}, path)
    return model


def make_adapter(path, base_path, base: Transformer, adapter: lora.LoRAConfig, tokenizer, labels=None):
    """An adapter checkpoint as adapters.keep_trainable writes it, with random B; (adapted model, head)."""
    cfg = base.cfg
    model = Transformer(cfg)
    model.load_state_dict(base.state_dict())
    lora.apply(model, adapter)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lora.layers(model):
            layer.lora_b.normal_(0.0, 0.05)
    state = {f"model.{k}": v for k, v in model.state_dict().items() if lora.is_adapter_key(k)}
    hparams = {"model": cfg.to_dict(), "adapter": adapter.to_dict()}
    head = None
    if labels is not None:
        head = {"weight": torch.randn(len(labels), cfg.dim), "bias": torch.randn(len(labels))}
        state.update({f"head.{k}": v for k, v in head.items()})
        hparams["labels"] = labels
    ckpt = {
        "state_dict": state,
        "hyper_parameters": hparams,
        "tokenizer": tokenizer.to_str(),
        "chat_template": CHAT_TEMPLATE,
        "optimizer_states": [{"state": {}}],
        "loops": {"fit_loop": {}},
        "adapter": {
            "config": adapter.to_dict(),
            "base": {"path": str(base_path.resolve()), "sha256": checkpoint.digest(base_path)},
            "tensors": sorted(state),
        },
    }
    torch.save(ckpt, path)
    return model.eval(), head


@pytest.fixture(params=list(CASES))
def pair(request, tmp_path, tokenizer):
    """(base path, adapter path, adapted model, base model, adapter config) of one case."""
    shape, adapter = CASES[request.param]
    cfg = debug_model(vocab_size=320, **shape)
    base = make_base(tmp_path / "base.ckpt", cfg, tokenizer).eval()
    adapted, _ = make_adapter(tmp_path / "adapter.ckpt", tmp_path / "base.ckpt", base, adapter, tokenizer)
    return tmp_path / "base.ckpt", tmp_path / "adapter.ckpt", adapted, base, adapter


def ours(path, merge=True, base=None) -> Transformer:
    """Our model from a checkpoint: adapters merged into the weights, or kept in LoRALinear layers."""
    ckpt = checkpoint.load(path, base=base)
    cfg = checkpoint.model_config_of(ckpt, path)
    model = Transformer(cfg)
    if not merge:
        lora.apply(model, lora.LoRAConfig.from_dict(ckpt["adapter"]["config"]))
    missing, unexpected = model.load_state_dict(checkpoint.model_state(ckpt, cfg, path, merge=merge), strict=False)
    assert not unexpected and set(missing) <= {"output.weight"}
    return model.eval()


def tokens(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def close(a, b, atol=1e-4):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def no_load_warnings(load):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = load()
    bad = [str(w.message) for w in caught if any(s in str(w.message).lower() for s in ("missing", "unexpected"))]
    assert not bad, bad
    return result


def test_to_hf_writes_the_merged_model(pair, tmp_path):
    base_path, adapter_path, adapted, base, _ = pair
    x = tokens(base.cfg)
    assert (logits(adapted, x) - logits(base, x)).abs().max() > 1e-2  # the adapters change the model
    close(logits(ours(adapter_path, merge=False), x), logits(adapted, x), atol=1e-6)

    assert convert.main(["to-hf", str(adapter_path), str(tmp_path / "hf")]) == 0
    hf, info = no_load_warnings(
        lambda: transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    )
    assert all(not v for v in info.values()), info
    close(logits(hf, x), logits(ours(adapter_path), x), atol=1e-5)  # the merged weights, as ours computes them
    close(logits(hf, x), logits(adapted, x))  # and as the adapted model does, adapters beside the weights


def test_adapter_only_is_what_peft_saves_and_loads(pair, tmp_path):
    base_path, adapter_path, adapted, base, adapter = pair
    base_dir, peft_dir = tmp_path / "base_hf", tmp_path / "peft"
    assert convert.main(["to-hf", str(base_path), str(base_dir)]) == 0
    assert convert.main(["to-hf", str(adapter_path), str(tmp_path / "merged_hf")]) == 0
    argv = ["to-hf", str(adapter_path), str(peft_dir), "--adapter-only", "--base-model", str(base_dir)]
    assert convert.main(argv) == 0

    config = json.loads((peft_dir / "adapter_config.json").read_text())
    hf_targets = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
    hf_targets |= {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    assert config["target_modules"] == sorted(hf_targets[t] for t in adapter.targets)
    assert (config["peft_type"], config["task_type"], config["bias"]) == ("LORA", "CAUSAL_LM", "none")
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (adapter.rank, adapter.alpha, 0.05)
    assert config["base_model_name_or_path"] == str(base_dir)

    # the tensor names and shapes PEFT itself saves for the same LoRA on the same model
    hf_base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    lora_config = peft.LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, target_modules=config["target_modules"])
    expected = peft.get_peft_model_state_dict(peft.get_peft_model(hf_base, lora_config))
    saved = load_file(peft_dir / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in expected.items()}

    # base_model_name_or_path leads AutoPeftModel to the base; logits as ours, adapted or merged
    model = no_load_warnings(lambda: peft.AutoPeftModelForCausalLM.from_pretrained(peft_dir)).eval()
    x = tokens(base.cfg)
    merged_hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged_hf")
    close(logits(model, x), logits(adapted, x))
    close(logits(model, x), logits(merged_hf, x))
    # PEFT's own merge gives the weights of our merged export
    merged = model.merge_and_unload().state_dict()
    for name, t in merged_hf.state_dict().items():
        close(merged[name], t, atol=1e-6)
    assert transformers.AutoTokenizer.from_pretrained(peft_dir).chat_template == CHAT_TEMPLATE


def test_merge_writes_a_full_checkpoint(pair, tmp_path):
    from llm.app.init_from import load_init
    from llm.generate import load_for_inference

    base_path, adapter_path, adapted, base, _ = pair
    out = tmp_path / "out" / "merged.ckpt"
    assert convert.main(["merge", str(adapter_path), str(out)]) == 0
    assert [p.name for p in out.parent.iterdir()] == ["merged.ckpt"]  # written atomically: no temporary left
    raw = torch.load(out, map_location="cpu", weights_only=False)
    assert not {"adapter", "optimizer_states", "loops"} & set(raw)
    assert "adapter" not in raw["hyper_parameters"] and not any(lora.is_adapter_key(k) for k in raw["state_dict"])
    assert raw["tokenizer"] == torch.load(base_path, weights_only=False)["tokenizer"]
    assert raw["chat_template"] == CHAT_TEMPLATE

    x = tokens(base.cfg)
    close(logits(ours(out), x), logits(adapted, x))
    assert torch.equal(logits(ours(out), x), logits(ours(adapter_path), x))  # the same merge as to-hf's
    model, tok, _ = load_for_inference(out)  # python -m llm.generate
    assert torch.equal(logits(model, x), logits(ours(out), x)) and tok is not None
    init = load_init(str(out), base.cfg.to_dict(), {})  # init_from=
    assert init.labels is None and init.chat_template == CHAT_TEMPLATE
    # to-hf of the merged checkpoint is to-hf of the adapter checkpoint, bit for bit
    convert.to_hf(out, tmp_path / "a")
    convert.to_hf(adapter_path, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_base_that_moved_or_changed(pair, tmp_path, capsys):
    base_path, adapter_path, adapted, base, _ = pair
    moved = tmp_path / "elsewhere" / "base.ckpt"
    moved.parent.mkdir()
    shutil.move(base_path, moved)
    for argv in (["to-hf", str(adapter_path), str(tmp_path / "hf")], ["merge", str(adapter_path), str(tmp_path / "m")]):
        assert convert.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "--base" in err and str(base_path) in err
        assert convert.main([*argv, "--base", str(moved)]) == 0
    capsys.readouterr()
    x = tokens(base.cfg)
    close(logits(ours(tmp_path / "m"), x), logits(adapted, x))
    # a PEFT adapter needs no base
    assert convert.main(["to-hf", str(adapter_path), str(tmp_path / "peft"), "--adapter-only"]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] is None

    other = tmp_path / "other.ckpt"
    make_base(other, base.cfg, train_tokenizer(TEXT, vocab_size=300), seed=5)  # same shape, other weights
    for argv in (
        ["to-hf", str(adapter_path), str(tmp_path / "hf2"), "--base", str(other)],
        ["merge", str(adapter_path), str(tmp_path / "m2"), "--base", str(other)],
        ["to-hf", str(adapter_path), str(tmp_path / "peft2"), "--adapter-only", "--base", str(other)],
    ):
        assert convert.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "sha256" in err and str(other) in err
    assert not (tmp_path / "m2").exists() and not (tmp_path / "peft2").exists()


def test_full_checkpoints_have_no_adapters(tmp_path, tokenizer, capsys):
    make_base(tmp_path / "full.ckpt", debug_model(vocab_size=320), tokenizer)
    full = str(tmp_path / "full.ckpt")
    for argv in (["to-hf", full, str(tmp_path / "peft"), "--adapter-only"], ["merge", full, str(tmp_path / "m")]):
        assert convert.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "has no adapters" in err and full in err
    assert convert.main(["to-hf", full, str(tmp_path / "hf"), "--base-model", "x"]) == 2
    assert "--adapter-only" in capsys.readouterr().err


def test_classifier_adapters(tmp_path, tokenizer, capsys):
    """A classifier's head is not a PEFT LoRA adapter: --adapter-only refuses; to-hf writes the (merged) backbone
    as it does for a full classifier checkpoint; merge keeps the head and labels."""
    cfg = debug_model(vocab_size=320, tie_embeddings=True)
    base = make_base(tmp_path / "base.ckpt", cfg, tokenizer).eval()
    labels = ["Emma", "Persuasion", "Sense and Sensibility"]
    adapter_path = tmp_path / "cls.ckpt"
    adapted, head = make_adapter(adapter_path, tmp_path / "base.ckpt", base, lora.LoRAConfig(rank=4), tokenizer, labels)

    assert convert.main(["to-hf", str(adapter_path), str(tmp_path / "peft"), "--adapter-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "classifier" in err and "merge" in err
    assert not (tmp_path / "peft").exists()

    assert convert.main(["to-hf", str(adapter_path), str(tmp_path / "hf")]) == 0
    x = tokens(cfg)
    close(logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf"), x), logits(adapted, x))

    assert convert.main(["merge", str(adapter_path), str(tmp_path / "merged.ckpt")]) == 0
    merged = checkpoint.load(tmp_path / "merged.ckpt")
    assert checkpoint.labels_of(merged) == labels
    got = checkpoint.head_state(merged)
    assert got.keys() == head.keys() and all(torch.equal(got[k], head[k]) for k in head)
    close(logits(ours(tmp_path / "merged.ckpt"), x), logits(adapted, x))


@pytest.mark.slow
def test_trained_adapters_export(tmp_path_factory, data_cache):
    """The real thing: pretrain, finetune with adapter=lora (a high learning rate: B far from zero), export."""
    import train

    run = [o for o in TINY if not o.startswith(("model.", "data."))]
    pre = tmp_path_factory.mktemp("pretrain")
    train.train(compose_config(TINY, run_dir=pre, cache_dir=data_cache))
    base_path = pre / "checkpoints" / "last.ckpt"
    ft = tmp_path_factory.mktemp("lora")
    overrides = ["experiment=finetune", "adapter=lora", f"init_from={base_path}", *run, "trainer.max_steps=4"]
    train.train(compose_config([*overrides, "optim.lr=0.05", "data.seq_len=200", "data.batch_size=4"], run_dir=ft))
    adapter_path = ft / "checkpoints" / "last.ckpt"
    raw = torch.load(adapter_path, map_location="cpu", weights_only=False)
    assert min(v.abs().max() for k, v in raw["state_dict"].items() if k.endswith("lora_b")) > 1e-2
    print(f"adapter checkpoint {adapter_path.stat().st_size} bytes, base {base_path.stat().st_size} bytes")

    out = tmp_path_factory.mktemp("export")
    assert convert.main(["to-hf", str(base_path), str(out / "base")]) == 0
    assert convert.main(["to-hf", str(adapter_path), str(out / "merged")]) == 0
    assert convert.main(["to-hf", str(adapter_path), str(out / "peft"), "--adapter-only"]) == 0
    assert convert.main(["merge", str(adapter_path), str(out / "merged.ckpt")]) == 0

    cfg = checkpoint.model_config_of(checkpoint.load(base_path), base_path)
    x = tokens(cfg)
    adapted = logits(ours(adapter_path, merge=False), x)
    assert (adapted - logits(ours(base_path), x)).abs().max() > 1e-2
    hf_base = transformers.LlamaForCausalLM.from_pretrained(out / "base")
    peft_model = no_load_warnings(lambda: peft.PeftModel.from_pretrained(hf_base, out / "peft")).eval()
    close(logits(peft_model, x), adapted)
    close(logits(transformers.LlamaForCausalLM.from_pretrained(out / "merged"), x), adapted)
    close(logits(ours(out / "merged.ckpt"), x), adapted)


def test_qk_norm_base_exports_as_qwen3_merged_and_as_a_peft_adapter(tmp_path, tokenizer):
    """A LoRA run on a base with qk_norm: its gains stay frozen with the other base weights (LoRA wraps the Linear
    layers only); to-hf writes the merged Qwen3 and --adapter-only a PEFT adapter that loads onto the base's export."""
    cfg = debug_model(vocab_size=320, qk_norm=True, tie_embeddings=True)
    base = make_base(tmp_path / "base.ckpt", cfg, tokenizer).eval()
    adapter = lora.LoRAConfig(rank=4, alpha=8.0)
    adapted, _ = make_adapter(tmp_path / "adapter.ckpt", tmp_path / "base.ckpt", base, adapter, tokenizer)
    assert not adapted.layers[0].attention.q_norm.weight.requires_grad
    assert {n for n, p in adapted.named_parameters() if p.requires_grad} == {
        f"layers.{i}.{lora.TARGETS[t]}.{t}.{key}"
        for i in range(2)
        for t in adapter.targets
        for key in ("lora_a", "lora_b")
    }

    for argv in (
        ["to-hf", str(tmp_path / "base.ckpt"), str(tmp_path / "base_hf")],
        ["to-hf", str(tmp_path / "adapter.ckpt"), str(tmp_path / "merged_hf")],
        ["to-hf", str(tmp_path / "adapter.ckpt"), str(tmp_path / "peft"), "--adapter-only",
         "--base-model", str(tmp_path / "base_hf")],
    ):  # fmt: skip
        assert convert.main(argv) == 0
    x = tokens(cfg)
    merged, info = no_load_warnings(
        lambda: transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged_hf", output_loading_info=True)
    )
    assert type(merged) is transformers.Qwen3ForCausalLM and all(not v for v in info.values()), info
    close(logits(merged, x), logits(adapted, x))
    peft_model = no_load_warnings(lambda: peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft")).eval()
    assert type(peft_model.get_base_model()) is transformers.Qwen3ForCausalLM
    close(logits(peft_model, x), logits(adapted, x))
