"""llm.convert: our checkpoints <-> Hugging Face Llama directories, checked against transformers itself."""

from __future__ import annotations

import io
import json
import logging
import tracemalloc
import warnings
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file

from datamodules.tokenizer import train_tokenizer
from llm import convert
from llm.core.config import ModelConfig
from llm.core.model import Transformer
from tests.conftest import debug_model

transformers = pytest.importorskip("transformers")

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
BASE = dict(debug_model(n_kv_heads=None, ffn_dim=160, vocab_size=320).to_dict())  # MHA unless a case says
CASES = {
    "untied-mha": dict(),
    "tied-gqa": dict(n_kv_heads=2, tie_embeddings=True),
    "mqa-theta": dict(n_kv_heads=1, rope_theta=500000.0, norm_eps=1e-6),
    "llama3-tied": dict(n_kv_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3, tie_embeddings=True),
}
TEXT = ["It is a truth universally acknowledged, that a single man in possession of a good fortune."] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT, vocab_size=300)


def make_ckpt(path, cfg: ModelConfig, tokenizer, dtype=torch.float32, seed=0):
    """A checkpoint shaped like Lightning's: `model.` prefix, metric state, hyper_parameters, tokenizer."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # norms start at ones; randomise them so that a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model = model.to(dtype)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["val_loss.mean_value"] = torch.tensor(3.0)  # not a model tensor: must be ignored
    ckpt = {
        "state_dict": state,
        "hyper_parameters": {"model": cfg.to_dict()},
        "tokenizer": tokenizer.to_str(),
        "optimizer_states": [],
    }
    torch.save(ckpt, path)
    return model


@contextmanager
def captured_hf_messages():
    """Every warning and every transformers log record of level WARNING or above, as one list of strings."""
    from transformers.utils import logging as hf_logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    logger = hf_logging.get_logger()  # the library's root logger: every submodule propagates to it
    logger.addHandler(handler)
    messages: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
    finally:
        logger.removeHandler(handler)
    messages.extend(str(w.message) for w in caught)
    messages.extend(line for line in stream.getvalue().splitlines() if line.strip())


def test_name_mapping_is_one_to_one():
    cfg = ModelConfig(**BASE)
    names = list(convert.expected_shapes(cfg))
    hf_names = [convert.to_hf_name(n) for n in names]
    assert len(set(hf_names)) == len(names)
    assert [convert.from_hf_name(n) for n in hf_names] == names
    with pytest.raises(KeyError):
        convert.from_hf_name("model.layers.0.self_attn.q_proj.bias")


def test_warning_capture_sees_a_missing_weight(tmp_path, tokenizer):
    """The no-warnings checks below are only meaningful if a bad directory does produce a message."""
    cfg = ModelConfig(**BASE)
    make_ckpt(tmp_path / "a.ckpt", cfg, tokenizer)
    out = convert.to_hf(tmp_path / "a.ckpt", tmp_path / "hf")
    weights = load_file(out / "model.safetensors")
    weights.pop("model.norm.weight")
    from safetensors.torch import save_file

    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    with captured_hf_messages() as messages:
        transformers.AutoModelForCausalLM.from_pretrained(out)
    assert any("model.norm.weight" in m for m in messages)


@pytest.mark.parametrize("case", list(CASES))
def test_to_hf_loads_cleanly_with_identical_logits(tmp_path, tokenizer, case):
    cfg = ModelConfig(**{**BASE, **CASES[case]})
    ours = make_ckpt(tmp_path / "a.ckpt", cfg, tokenizer).eval()
    sharded = case == "tied-gqa"
    out = convert.to_hf(tmp_path / "a.ckpt", tmp_path / "hf", max_shard_bytes=40_000 if sharded else 10**9)

    with captured_hf_messages() as messages:
        hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert messages == []
    assert all(not v for v in info.values()), info
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    assert hf.config.num_key_value_heads == cfg.n_kv_heads
    if cfg.tie_embeddings:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight

    tokens = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(hf(tokens).logits, ours(tokens))

    # the tokenizer: same ids as ours, special tokens named in both files AutoTokenizer reads
    text = "It is a truth universally acknowledged"
    assert hf_tok(text).input_ids == tokenizer.encode(text).ids
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (0, 1, 2)
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (0, 1, 2)
    special_map = json.loads((out / "special_tokens_map.json").read_text())
    assert special_map == {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}

    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = sorted(out.glob("model-*-of-*.safetensors"))
        assert len(files) > 1 and not (out / "model.safetensors").exists()
        assert set(index["weight_map"].values()) == {f.name for f in files}
        assert "lm_head.weight" not in index["weight_map"]  # tied: transformers ties it itself
        assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in hf.parameters())


def test_config_json_reads_in_both_transformers_spellings(tokenizer, tmp_path):
    """transformers 5 reads rope_parameters; 4 reads rope_theta and rope_scaling (without rope_theta inside)."""
    cfg = ModelConfig(**{**BASE, **CASES["llama3-tied"]})
    make_ckpt(tmp_path / "a.ckpt", cfg, tokenizer)
    hf = json.loads((convert.to_hf(tmp_path / "a.ckpt", tmp_path / "hf") / "config.json").read_text())
    assert hf["rope_parameters"] == {**LLAMA3, "rope_theta": 500000.0}
    assert hf["rope_scaling"] == LLAMA3 and hf["rope_theta"] == 500000.0
    assert hf["architectures"] == ["LlamaForCausalLM"]
    v4 = {k: v for k, v in hf.items() if k != "rope_parameters"}
    v4["rope_scaling"] = {**{k: v for k, v in LLAMA3.items() if k != "rope_type"}, "type": "llama3"}
    assert convert.config_from_hf(v4, "v4") == cfg
    assert convert.config_from_hf(hf, "v5") == cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["untied-mha", "llama3-tied"])
def test_round_trip_ours_hf_ours_is_bitwise(tmp_path, tokenizer, case, dtype):
    cfg = ModelConfig(**{**BASE, **CASES[case]})
    make_ckpt(tmp_path / "a.ckpt", cfg, tokenizer, dtype=dtype)
    convert.to_hf(tmp_path / "a.ckpt", tmp_path / "hf", max_shard_bytes=30_000)
    convert.from_hf(tmp_path / "hf", tmp_path / "b.ckpt")
    a = torch.load(tmp_path / "a.ckpt", weights_only=False)
    b = torch.load(tmp_path / "b.ckpt", weights_only=False)
    a_state = {k: v for k, v in a["state_dict"].items() if k.startswith("model.")}
    assert a_state.keys() == b["state_dict"].keys()
    for k, v in a_state.items():
        assert v.dtype == b["state_dict"][k].dtype == dtype and torch.equal(v, b["state_dict"][k]), k
    assert ModelConfig.from_dict(b["hyper_parameters"]["model"]) == cfg
    assert b["tokenizer"] == a["tokenizer"]
    assert b["special_tokens"] == {"bos": 0, "eos": 1, "pad": 2, "eos_ids": [1]}
    if cfg.tie_embeddings:  # one tensor under both names, as in a tied model's own state_dict
        assert b["state_dict"]["model.output.weight"] is b["state_dict"]["model.tok_embeddings.weight"]


CHAT_TEMPLATE = "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"


def hf_random_dir(path, tokenizer, chat_template=None, **overrides):
    """A random Llama saved by transformers itself (a model nobody here wrote), with our tokenizer files."""
    kwargs = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**kwargs, **overrides}))
    model.save_pretrained(path)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    fast.chat_template = chat_template
    fast.save_pretrained(path)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_hf_ours_hf_is_bitwise(tmp_path, tokenizer, tied):
    rope = {**LLAMA3, "rope_theta": 500000.0}
    hf_random_dir(
        tmp_path / "hf",
        tokenizer,
        chat_template=CHAT_TEMPLATE,
        tie_word_embeddings=tied,
        rope_parameters=rope,
        eos_token_id=[1, 5],
    )
    convert.from_hf(tmp_path / "hf", tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=False)
    assert ckpt["special_tokens"] == {"bos": 0, "eos": 1, "pad": 2, "eos_ids": [1, 5]}
    assert ckpt["chat_template"] == CHAT_TEMPLATE
    convert.to_hf(tmp_path / "a.ckpt", tmp_path / "hf2")

    original, again = (
        load_file(tmp_path / "hf" / "model.safetensors"),
        load_file(tmp_path / "hf2" / "model.safetensors"),
    )
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    c1 = json.loads((tmp_path / "hf" / "config.json").read_text())
    c2 = json.loads((tmp_path / "hf2" / "config.json").read_text())
    for key in ("hidden_size", "num_key_value_heads", "rope_parameters", "tie_word_embeddings", "eos_token_id"):
        assert c1[key] == c2[key], key
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (tmp_path / "hf2" / "tokenizer.json").read_bytes()
    with captured_hf_messages() as messages:
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2")
        hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2")
    assert messages == []
    assert hf_tok.chat_template == CHAT_TEMPLATE


def test_from_hf_checkpoint_is_accepted_by_init_from(tmp_path, tokenizer, tiny_cfg):
    from llm.app.spec import resolve

    hf = hf_random_dir(tmp_path / "hf", tokenizer, tie_word_embeddings=True, num_key_value_heads=1)
    convert.from_hf(tmp_path / "hf", tmp_path / "a.ckpt")
    cfg = tiny_cfg(f"init_from={tmp_path / 'a.ckpt'}")
    spec = resolve(cfg)
    init = spec.init
    assert (spec.model.dim, spec.model.n_kv_heads, spec.model.vocab_size) == (64, 1, 320)  # the checkpoint's shape
    assert init.tokenizer_json == (tmp_path / "hf" / "tokenizer.json").read_text()
    assert init.extras["special_tokens"]["eos"] == 1
    hf_state = hf.state_dict()
    for name, tensor in init.state.items():
        assert torch.equal(tensor, hf_state[convert.to_hf_name(name)]), name


def test_from_hf_reads_transformers_4_configs(tmp_path, tokenizer):
    """A transformers 4 config.json: rope_theta and rope_scaling ("type" spelling), no rope_parameters."""
    hf_random_dir(tmp_path / "hf", tokenizer, tie_word_embeddings=True)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["rope_parameters"], config["bos_token_id"], config["eos_token_id"]
    scaling = {k: v for k, v in LLAMA3.items() if k not in ("rope_type", "original_max_position_embeddings")}
    config.update(rope_theta=250000.0, rope_scaling={**scaling, "type": "llama3"}, torch_dtype="float32")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    convert.from_hf(tmp_path / "hf", tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=False)
    cfg = ModelConfig.from_dict(ckpt["hyper_parameters"]["model"])
    assert cfg.rope_theta == 250000.0 and cfg.tie_embeddings and cfg.n_kv_heads == 2
    # transformers' rule: original_max_position_embeddings defaults to max_position_embeddings
    assert cfg.rope_scaling == {**LLAMA3, "original_max_position_embeddings": 64}
    # ids missing from config.json come from the tokenizer files
    assert ckpt["special_tokens"] == {"bos": 0, "eos": 1, "pad": 2, "eos_ids": [1]}


def test_to_hf_holds_one_shard_at_a_time(tmp_path, tokenizer):
    """The checkpoint is memory-mapped and each shard is serialised on its own, so what the writer allocates
    (safetensors builds each shard's bytes in Python, which tracemalloc sees) stays near one shard."""
    cfg = ModelConfig(**{**BASE, "dim": 128, "n_layers": 4, "ffn_dim": 384})
    make_ckpt(tmp_path / "a.ckpt", cfg, tokenizer)
    total = sum(4 * n for n in (torch.Size(s).numel() for s in convert.expected_shapes(cfg).values()))
    shard = 200_000  # bytes: the largest tensor (128 x 384 x 4) fits
    tracemalloc.start()
    try:
        convert.to_hf(tmp_path / "a.ckpt", tmp_path / "hf", max_shard_bytes=shard)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) >= total // shard
    assert peak < 2 * shard < total / 4


def test_user_errors_are_one_line(tmp_path, capsys, tokenizer):
    assert convert.main(["to-hf", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "missing.ckpt" in err
    assert convert.main(["from-hf", str(tmp_path), str(tmp_path / "x.ckpt")]) == 2
    assert "no config.json" in capsys.readouterr().err

    cfg = ModelConfig(**BASE)
    make_ckpt(tmp_path / "a.ckpt", cfg, tokenizer)
    wrong = ModelConfig(**{**BASE, "n_layers": 3})
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=False)
    ckpt["hyper_parameters"]["model"] = wrong.to_dict()
    torch.save(ckpt, tmp_path / "b.ckpt")
    assert convert.main(["to-hf", str(tmp_path / "b.ckpt"), str(tmp_path / "out")]) == 2
    assert "layers.2" in capsys.readouterr().err

    hf_random_dir(tmp_path / "hf", tokenizer)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert convert.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "x.ckpt")]) == 2
    assert "yarn" in capsys.readouterr().err
