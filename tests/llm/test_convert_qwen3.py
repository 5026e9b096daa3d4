"""llm.convert with model.qk_norm: our decoder with QK-norm is Qwen3's, so it exports as Qwen3ForCausalLM and reads
back, checked against transformers' Qwen3 itself (float32, CPU). Without qk_norm the export stays Llama."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from datamodules.tokenizer import train_tokenizer
from llm import convert
from llm.core.config import ModelConfig
from llm.core.sampling import generate as run_generate
from llm.generate import load_for_inference
from tests.conftest import debug_model
from tests.llm.test_convert import LLAMA3, TEXT, captured_hf_messages, make_ckpt

transformers = pytest.importorskip("transformers")

BASE = debug_model(ffn_dim=160, vocab_size=320, qk_norm=True).to_dict()  # head_dim 16
CASES = {
    "gqa-untied": dict(n_kv_heads=2),
    "mqa-tied-llama3": dict(n_kv_heads=1, tie_embeddings=True, rope_theta=500000.0, rope_scaling=LLAMA3),
    "mha-eps-sharded": dict(n_kv_heads=None, norm_eps=1e-6, rope_theta=1234.0),
}
QK_NAMES = {f"model.layers.{i}.self_attn.{qk}_norm.weight" for i in range(2) for qk in "qk"}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT, vocab_size=300)


def weight_names(out) -> set[str]:
    index = out / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    return set(load_file(out / "model.safetensors"))


@pytest.mark.parametrize("case", list(CASES))
def test_to_hf_is_a_qwen3_with_our_logits(tmp_path, tokenizer, case):
    cfg = ModelConfig(**{**BASE, **CASES[case]})
    ours = make_ckpt(tmp_path / "a.ckpt", cfg, tokenizer).eval()  # every gain random, q_norm and k_norm included
    sharded = case.endswith("sharded")
    out = convert.to_hf(tmp_path / "a.ckpt", tmp_path / "hf", max_shard_bytes=40_000 if sharded else 10**9)

    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == (["Qwen3ForCausalLM"], "qwen3")
    assert (config["head_dim"], config["rms_norm_eps"], config["tie_word_embeddings"]) == (
        16,
        cfg.norm_eps,
        cfg.tie_embeddings,
    )
    assert (config["attention_bias"], config["use_sliding_window"], config["sliding_window"]) == (False, False, None)
    assert QK_NAMES <= weight_names(out) and sharded == (out / "model.safetensors.index.json").is_file()

    with captured_hf_messages() as messages:
        hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert messages == []
    assert all(not v for v in info.values()), info
    assert type(hf) is transformers.Qwen3ForCausalLM
    assert hf.config.layer_types == ["full_attention"] * cfg.n_layers and not hf.config.attention_bias
    assert hf.model.layers[0].self_attn.q_norm.variance_epsilon == cfg.norm_eps
    if cfg.tie_embeddings:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight

    tokens = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    eager = transformers.Qwen3ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = ours(tokens)
        assert torch.equal(hf(tokens).logits, expected)  # SDPA as ours: the same float32 operations
        # eager attention (matmul + softmax) differs in rounding only: tests/llm/test_hf_parity.py's tolerance
        torch.testing.assert_close(eager(tokens).logits, expected, rtol=1e-5, atol=1e-5)

    text = "It is a truth universally acknowledged"
    assert hf_tok(text).input_ids == tokenizer.encode(text).ids
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (0, 1, 2)


def hf_greedy(model, prompts: list[list[int]], n: int, pad: int = 2) -> list[list[int]]:
    """transformers' generate (its own KV cache) on left-padded prompts, greedy, the new tokens of each row."""
    T0 = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (T0 - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T0 - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad)
    return out[:, T0:].tolist()


def test_greedy_generation_equals_transformers_generate(tmp_path, tokenizer):
    # init_std 0.08: peakier distributions than the default init, so the argmax is never a near tie
    cfg = ModelConfig(**{**BASE, "n_kv_heads": 2, "max_seq_len": 128, "init_std": 0.08})
    make_ckpt(tmp_path / "a.ckpt", cfg, tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(convert.to_hf(tmp_path / "a.ckpt", tmp_path / "hf")).eval()
    hf.generation_config.eos_token_id = None  # run every row to the end: 24 tokens each
    ours, _, ids = load_for_inference(tmp_path / "a.ckpt")
    prompts = [[0, 17, 42, 99, 5, 230, 7], [0, 3], [0, 250, 11, 12, 13], [0, 8, 9, 10, 11, 12, 13, 14, 15, 16, 70]]
    expected = hf_greedy(hf, prompts, 24)
    assert run_generate(ours, prompts, 24, eos_id=None, pad_id=ids["pad"]) == expected
    assert len({tuple(row) for row in expected}) == len(prompts)  # the rows differ: the prompts are read


def hf_qwen3_dir(path, tokenizer, **overrides):
    """A random Qwen3 saved by transformers itself (norm gains random: its init sets them to ones), our tokenizer."""
    kwargs = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # Qwen3Config's default is 128 whatever the width
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**kwargs, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(path)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_hf_ours_hf_is_bitwise(tmp_path, tokenizer, tied):
    rope = {**LLAMA3, "rope_theta": 500000.0} if tied else {"rope_type": "default", "rope_theta": 20000.0}
    hf = hf_qwen3_dir(tmp_path / "hf", tokenizer, tie_word_embeddings=tied, rope_parameters=rope)
    convert.from_hf(tmp_path / "hf", tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=False)
    cfg = ModelConfig.from_dict(ckpt["hyper_parameters"]["model"])
    assert cfg.qk_norm and (cfg.head_dim, cfg.n_kv_heads, cfg.tie_embeddings) == (16, 2, tied)
    assert torch.equal(
        ckpt["state_dict"]["model.layers.1.attention.k_norm.weight"], hf.model.layers[1].self_attn.k_norm.weight
    )
    convert.to_hf(tmp_path / "a.ckpt", tmp_path / "hf2")

    original, again = (
        load_file(tmp_path / "hf" / "model.safetensors"),
        load_file(tmp_path / "hf2" / "model.safetensors"),
    )
    assert original.keys() == again.keys() and QK_NAMES <= set(again)
    assert all(torch.equal(original[k], again[k]) for k in original)
    c1 = json.loads((tmp_path / "hf" / "config.json").read_text())
    c2 = json.loads((tmp_path / "hf2" / "config.json").read_text())
    for key in ("model_type", "architectures", "head_dim", "hidden_size", "num_key_value_heads", "rope_parameters",
                "tie_word_embeddings", "rms_norm_eps", "attention_bias", "use_sliding_window", "sliding_window"):  # fmt: skip
        assert c1[key] == c2[key], key
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (tmp_path / "hf2" / "tokenizer.json").read_bytes()
    with captured_hf_messages() as messages:
        again_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
        transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2")
    assert messages == []
    tokens = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(again_hf(tokens).logits, hf.eval()(tokens).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_ours_hf_ours_is_bitwise(tmp_path, tokenizer, dtype):
    cfg = ModelConfig(**{**BASE, **CASES["mqa-tied-llama3"]})
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


def test_without_qk_norm_the_export_stays_llama():
    ids = {"bos": 0, "eos": 1, "pad": 2}
    llama = convert.hf_config(debug_model(), ids, torch.float32)
    qwen3 = convert.hf_config(debug_model(qk_norm=True), ids, torch.float32)
    assert (llama["architectures"], llama["model_type"]) == (["LlamaForCausalLM"], "llama")
    assert set(qwen3) - set(llama) == {"use_sliding_window", "sliding_window", "max_window_layers"}
    assert set(llama) - set(qwen3) == {"mlp_bias", "pretraining_tp"}  # Llama's own keys
    assert {k: v for k, v in qwen3.items() if k in llama and k not in ("architectures", "model_type")} == {
        k: v for k, v in llama.items() if k in qwen3 and k not in ("architectures", "model_type")
    }
    assert convert.config_from_hf(llama, "llama") == debug_model()
    assert convert.config_from_hf(qwen3, "qwen3") == debug_model(qk_norm=True)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ({"head_dim": None}, "head_dim"),  # Qwen3Config's default head_dim, 128: 4 x 128 is not hidden_size 64
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "q_norm"),  # Llama has no q_norm weights
    ],
)
def test_from_hf_refuses_what_our_model_cannot_run_in_one_line(tmp_path, tokenizer, capsys, change, named):
    hf_qwen3_dir(tmp_path / "hf", tokenizer)
    path = tmp_path / "hf" / "config.json"
    config = {**json.loads(path.read_text()), **change}
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    capsys.readouterr()  # transformers' progress bars
    assert convert.main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "a.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err and str(path.parent) in err
    assert not (tmp_path / "a.ckpt").exists()
