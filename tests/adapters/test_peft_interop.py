"""Interop with the real Hugging Face PEFT: our files load in PEFT, PEFT's load in ours, merges agree."""

import copy

import pytest
import torch

import rankdial as rd
from conftest import minilm, model_output, tiny_model, token_batch

peft = pytest.importorskip("peft")

TOL = dict(rtol=0, atol=1e-5)
KINDS = ["llama", "qwen2", "gpt2", "bert", "minilm"]
VOCAB = {"minilm": 30522}


def build(kind):
    return minilm() if kind == "minilm" else tiny_model(kind)


def targets(kind):
    return {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["k_proj", "o_proj", "up_proj"],
            "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value", "dense"], "minilm": ["query", "value"]}[kind]


def saved_module(kind):
    return {"llama": ["lm_head"], "qwen2": ["norm"], "gpt2": ["ln_f"], "bert": ["classifier"], "minilm": ["pooler"]}[kind]


def rank_pattern(kind):
    first = targets(kind)[0]
    return {first: 6}, {first: 3.0}


def randomize(model, seed=5):
    """Give every adapter matrix random values (the default B = 0 would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def ids_for(kind):
    return token_batch(vocab=VOCAB.get(kind, 96))


@pytest.mark.parametrize("kind", KINDS)
def test_rankdial_adapter_loads_in_peft_with_same_outputs(kind, tmp_path):
    base = build(kind)
    ours = copy.deepcopy(base)
    ranks, alphas = rank_pattern(kind)
    rd.inject(ours, rd.LoraConfig(r=4, lora_alpha=8, target_modules=targets(kind), rank_pattern=ranks,
                                  alpha_pattern=alphas, use_rslora=True, modules_to_save=saved_module(kind)))
    randomize(ours)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".modules_to_save." in name:
                p.add_(0.1)
    rd.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    ids = ids_for(kind)
    expected = model_output(ours, ids)
    assert not torch.allclose(expected, model_output(base, ids), atol=1e-3)
    torch.testing.assert_close(model_output(theirs, ids), expected, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapter_loads_in_rankdial_with_same_outputs(kind, tmp_path):
    base = build(kind)
    ranks, alphas = rank_pattern(kind)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets(kind), rank_pattern=ranks, alpha_pattern=alphas,
                          use_rslora=True, modules_to_save=saved_module(kind), init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():  # make the saved copy differ from the original module
        for name, p in theirs.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1)
    theirs.save_pretrained(tmp_path / "p")
    ours = copy.deepcopy(base)
    rd.load_adapter(ours, tmp_path / "p")
    ids = ids_for(kind)
    torch.testing.assert_close(model_output(ours, ids), model_output(theirs, ids), **TOL)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_all_linear_means_the_same_modules_in_peft(kind, tmp_path):
    base = tiny_model(kind)
    ours = copy.deepcopy(base)
    task = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    rd.inject(ours, rd.LoraConfig(r=2, target_modules="all-linear", task_type=task))
    rd.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    their_paths = {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in theirs.named_modules()
                   if n.endswith(".lora_A")}
    assert their_paths == {p for p, _ in rd.lora.lora_layers(ours)}
    peft_own = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules="all-linear", task_type=task))
    assert {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in peft_own.named_modules()
            if n.endswith(".lora_A")} == their_paths


@pytest.mark.parametrize("kind", ["llama", "gpt2", "minilm"])
def test_merge_and_unload_matches_peft(kind, tmp_path):
    base = build(kind)
    ours = copy.deepcopy(base)
    rd.inject(ours, rd.LoraConfig(r=4, lora_alpha=16, target_modules=targets(kind)))
    randomize(ours)
    rd.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").merge_and_unload()
    ours = rd.merge_and_unload(ours)
    their_state = theirs.state_dict()
    our_state = ours.state_dict()
    assert set(our_state) == set(their_state)
    for key, value in our_state.items():
        torch.testing.assert_close(value, their_state[key], rtol=1e-5, atol=1e-6, msg=key)
    ids = ids_for(kind)
    torch.testing.assert_close(model_output(ours, ids), model_output(theirs, ids), **TOL)
