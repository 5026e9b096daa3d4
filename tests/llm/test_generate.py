"""llm.generate: the KV cache changes nothing but speed, greedy decoding equals transformers' generate on models
transformers built itself, and sampling is seeded."""

from __future__ import annotations

import pytest
import torch

from datamodules.tokenizer import train_tokenizer
from llm import convert, generate
from llm.core.model import Transformer
from llm.core.sampling import generate as run_generate
from llm.core.sampling import sample
from llm.generate import load_for_inference
from tests.conftest import debug_model

transformers = pytest.importorskip("transformers")

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
# Hugging Face LlamaConfig arguments of the models under test
HF_SHAPES = {
    "mha-untied": dict(num_key_value_heads=4),
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mqa-theta": dict(num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "llama3-scaling": dict(
        num_key_value_heads=2, tie_word_embeddings=True, rope_parameters={**LLAMA3, "rope_theta": 500000.0}
    ),
}
PROMPTS = [[0, 17, 42, 99, 5, 230, 7], [0, 3], [0, 250, 11, 12, 13], [0, 8, 9, 10, 11, 12, 13, 14, 15, 16, 70]]


def our_model(seed: int = 0, **overrides) -> Transformer:
    cfg = debug_model(**{"ffn_dim": 160, "max_seq_len": 128, **overrides})
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights than the init: peakier distributions, far from argmax ties
        for p in model.parameters():
            p.mul_(4.0)
    return model


def naive_greedy(model: Transformer, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    """The reference: recompute the whole sequence at every step, no cache, no padding, no mask."""
    seq = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True, "n_kv_heads": 1, "rope_scaling": LLAMA3}])
def test_kv_cache_equals_recomputing_the_sequence(overrides):
    model = our_model(**overrides)
    for prompt in PROMPTS:
        assert run_generate(model, [prompt], 20) == [naive_greedy(model, prompt, 20)]


def test_left_padded_batch_equals_each_prompt_alone():
    model = our_model()
    batch = run_generate(model, PROMPTS, 16)
    assert batch == [naive_greedy(model, p, 16) for p in PROMPTS]
    assert all(len(row) == 16 for row in batch)


def test_stops_at_eos_and_at_max_new_tokens():
    model = our_model()
    free = run_generate(model, PROMPTS, 12)
    j = next(j for j in range(2, 12) if free[0][j] not in free[0][:j])
    eos = free[0][j]  # a token row 0 first produces at step j + 1: now it ends that row there
    stopped = run_generate(model, PROMPTS, 12, eos_id=[300, eos])
    assert stopped == [naive_greedy(model, p, 12, eos=eos) for p in PROMPTS]
    assert stopped[0] == free[0][:j]
    assert run_generate(model, PROMPTS[:1], 3) == [free[0][:3]]
    assert run_generate(model, PROMPTS[:1], 0) == [[]]


def test_prompt_longer_than_the_context_keeps_its_end():
    model = our_model(max_seq_len=32)
    prompt = list(range(3, 60))
    new = run_generate(model, [prompt], 8)[0]
    assert len(new) == 8 and new == naive_greedy(model, prompt[-24:], 8)


def test_sampling_is_seeded_and_its_cuts_reach_greedy():
    model = our_model()
    kw = dict(temperature=1.0, seed=7)
    first = run_generate(model, PROMPTS, 16, **kw)
    assert run_generate(model, PROMPTS, 16, **kw) == first
    assert run_generate(model, PROMPTS, 16, temperature=1.0, seed=8) != first
    greedy = run_generate(model, PROMPTS, 16)
    assert first != greedy  # sampling does sample
    assert run_generate(model, PROMPTS, 16, top_k=1, **kw) == greedy
    assert run_generate(model, PROMPTS, 16, top_p=1e-6, **kw) == greedy
    assert run_generate(model, PROMPTS, 16, top_k=1, temperature=5.0, seed=3) == greedy


def test_sample_cuts():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {0, 1}
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...: top_p 0.8 keeps the first two (0.64 < 0.8 <= 0.88)
    assert probs[0] < 0.8 <= probs[:2].sum()
    draws = {int(sample(logits, 1.0, top_p=0.8, generator=g)) for _ in range(200)}
    assert draws == {0, 1}
    assert int(sample(logits, 0.0)) == 0


def hf_llama(**overrides):
    kwargs = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        initializer_range=0.08,  # peakier than 0.02: the argmax is never a near tie
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**kwargs, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def hf_greedy(model, prompts: list[list[int]], n: int, eos, pad: int = 2) -> list[list[int]]:
    T0 = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (T0 - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T0 - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=pad
    )
    eos_ids = eos if isinstance(eos, list) else [eos]
    rows = []
    for row in out[:, T0:].tolist():
        stop = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
        rows.append(row[:stop])
    return rows


@pytest.mark.parametrize("shape", list(HF_SHAPES))
def test_greedy_equals_transformers_generate(tmp_path, shape):
    hf = hf_llama(**HF_SHAPES[shape])
    hf.save_pretrained(tmp_path / "hf")
    convert.from_hf(tmp_path / "hf", tmp_path / "model.ckpt")
    ours, _, ids = load_for_inference(tmp_path / "model.ckpt")

    expected = hf_greedy(hf, PROMPTS, 24, eos=[255])
    assert run_generate(ours, PROMPTS, 24, eos_id=[255], pad_id=ids["pad"]) == expected
    # a token the model does produce (first at step j of row 1): now it also ends rows
    j = next(j for j in range(3, 24) if expected[1][j] not in expected[1][:j])
    eos = expected[1][j]
    expected = hf_greedy(hf, PROMPTS, 24, eos=[255, eos])
    assert run_generate(ours, PROMPTS, 24, eos_id=[255, eos], pad_id=ids["pad"]) == expected
    assert len(expected[1]) == j


def test_cli_prints_the_completion(tmp_path, capsys):
    tokenizer = train_tokenizer(["It is a truth universally acknowledged, that a single man."] * 20, vocab_size=300)
    model = our_model(vocab_size=320)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    ckpt = {"state_dict": state, "hyper_parameters": {"model": model.cfg.to_dict()}, "tokenizer": tokenizer.to_str()}
    torch.save(ckpt, tmp_path / "last.ckpt")
    args = [f"ckpt_path={tmp_path / 'last.ckpt'}", "prompt=It is a truth", "max_new_tokens=5"]
    assert generate.main(args) == 0
    out = capsys.readouterr()
    assert out.out.startswith("It is a truth") and "tokens/s" in out.err
    ids = tokenizer.encode("It is a truth").ids
    expected = tokenizer.decode(run_generate(model, [ids], 5, eos_id=1)[0])
    assert out.out == "It is a truth" + expected + "\n"

    assert generate.main([*args[:2], "prompt=[a b,c]", "temperature=0.7", "top_p=0.9", "seed=1"]) == 0
    completions = capsys.readouterr().out.split("\n---\n")
    assert len(completions) == 2 and completions[0].startswith("a b") and completions[1].startswith("c")

    for bad, message in [
        (["prompt=x"], "ckpt_path=CKPT is required"),
        ([args[0], "temprature=1"], "unknown argument"),
        ([args[0], "top_p=1.5"], "top_p=1.5"),
        ([args[0], "max_new_tokens=many"], "max_new_tokens"),
        ([f"ckpt_path={tmp_path / 'nope.ckpt'}"], "no such checkpoint"),
    ]:
        assert generate.main(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
