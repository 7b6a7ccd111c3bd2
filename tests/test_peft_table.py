"""The README's table of PEFT verbs and their rankdial equivalents, one test per row, each side by side with
PEFT on the same base and the same adapter weights."""

import copy

import pytest
import torch

import rankdial as rd
from conftest import model_output, tiny_model, token_batch

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def pair(names=("default",)):
    """(rankdial model, PEFT model) on the same base with the same random adapter weights, for each name."""
    base = tiny_model("llama")
    ours = copy.deepcopy(base)
    theirs = None
    for i, name in enumerate(names):
        rd.inject(ours, rd.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False), adapter=name)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
        if theirs is None:
            theirs = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
        else:
            theirs.add_adapter(name, cfg)
        peft.set_peft_model_state_dict(theirs, rd.adapter_state_dict(ours, name), adapter_name=name)
    return ours, theirs


def same(a, b, ids=None):
    ids = token_batch() if ids is None else ids
    torch.testing.assert_close(model_output(a, ids), model_output(b, ids), rtol=1e-5, atol=1e-5)


def test_get_peft_model_is_inject():
    ours, theirs = pair()
    same(ours, theirs)


def test_set_adapter_is_set_active():
    ours, theirs = pair(("one", "two"))
    rd.set_active(ours, "two")
    theirs.set_adapter("two")
    same(ours, theirs)


def test_disable_adapter_is_disabled():
    ours, theirs = pair()
    with rd.disabled(ours), theirs.disable_adapter():
        same(ours, theirs)
        same(ours, tiny_model("llama"))


def test_merge_adapter_and_unmerge_adapter_are_merge_and_unmerge():
    ours, theirs = pair()
    rd.merge(ours)
    theirs.merge_adapter()
    same(ours, theirs)
    rd.unmerge(ours)
    theirs.unmerge_adapter()
    same(ours, theirs)


def test_unload_is_unload():
    ours, theirs = pair()
    same(rd.unload(ours), theirs.unload())


def test_merge_and_unload_with_safe_merge_is_merge_and_unload():
    ours, theirs = pair()
    a, b = rd.merge_and_unload(ours), theirs.merge_and_unload(safe_merge=True)
    assert a.state_dict().keys() == b.state_dict().keys()
    same(a, b)


def test_print_trainable_parameters_is_trainable_parameters(capsys):
    ours, theirs = pair()
    theirs.print_trainable_parameters()
    numbers = [float(n.replace(",", "")) for n in __import__("re").findall(r"[\d,.]+\d", capsys.readouterr().out)]
    report = rd.trainable_parameters(ours)
    assert numbers[:2] == [report.trainable, report.total]
    assert round(numbers[2], 2) == round(100 * report.share, 2)
    assert report.summary().startswith(f"trainable params: {report.trainable:,} || all params: {report.total:,}")


def test_peft_model_from_pretrained_and_load_adapter_are_load_adapter(tmp_path):
    ours, theirs = pair()
    theirs.save_pretrained(tmp_path / "peft")
    loaded = tiny_model("llama")
    rd.load_adapter(loaded, tmp_path / "peft")
    same(loaded, peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "peft"))
    rd.load_adapter(loaded, tmp_path / "peft", adapter="other")
    theirs.load_adapter(tmp_path / "peft", adapter_name="other")
    rd.set_active(loaded, "other")
    theirs.set_adapter("other")
    same(loaded, theirs)


def test_peft_save_pretrained_is_save_adapter(tmp_path):
    ours, _ = pair()
    rd.save_adapter(ours, tmp_path / "ours")
    same(peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours"), ours)


def test_state_dict_functions_are_adapter_state_dict_and_set_adapter_state_dict():
    ours, theirs = pair()
    mine = rd.adapter_state_dict(ours)
    peft_keys = peft.get_peft_model_state_dict(theirs)
    assert mine.keys() == peft_keys.keys()
    assert all(torch.equal(mine[k], peft_keys[k]) for k in mine)
    fresh, _ = pair()
    rd.set_adapter_state_dict(fresh, {k: v.clone() for k, v in peft_keys.items()})
    same(fresh, theirs)


def test_delete_adapter_is_delete_adapter():
    ours, theirs = pair(("one", "two"))
    rd.delete_adapter(ours, "two")
    theirs.delete_adapter("two")
    assert rd.adapter_names(ours) == ["one"] == list(theirs.peft_config)
    same(ours, theirs)


def test_prepare_model_for_kbit_training_is_not_needed():
    """PEFT's prepare_model_for_kbit_training freezes the base, keeps trainable weights in fp32 and enables
    gradient checkpointing. inject() freezes and keeps adapters in fp32 on a bf16 base; checkpointing is one
    transformers call. A training step then gives gradients to the adapters only."""
    model = tiny_model("llama").to(torch.bfloat16)
    rd.inject(model, rd.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = token_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    assert all(p.grad is not None for n, p in trainable.items() if ".lora_B." in n)


def test_use_dora_is_use_dora(tmp_path):
    base = tiny_model("llama")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                      use_dora=True, init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "p")
    ours = copy.deepcopy(base)
    rd.load_adapter(ours, tmp_path / "p")
    same(ours, theirs.eval())


@pytest.mark.parametrize("init", ["gaussian", "pissa", "olora"])
def test_init_lora_weights_is_init_lora_weights(init):
    base = tiny_model("llama")
    ours = copy.deepcopy(base)
    torch.manual_seed(0)
    rd.inject(ours, rd.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                      init_lora_weights=init))
    their = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, their["base_model.model." + name], rtol=1e-5, atol=1e-5)


def test_loftq_config_is_loftq_config():
    """PEFT's LoftQ needs CUDA; held to its defining property: deq(Q) + s·BA is nearer W than deq(NF4(W))."""
    base = tiny_model("llama")
    ours = copy.deepcopy(base)
    rd.inject(ours, rd.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="loftq",
                                  loftq_config=vars(peft.LoftQConfig(loftq_bits=4, loftq_iter=1))))
    for path, layer in rd.lora.lora_layers(ours):
        w = base.get_submodule(path).weight
        plain = rd.quant.nf4.dequantize_nf4(rd.quant.nf4.quantize_nf4(w.detach()), torch.float32)
        assert (layer.merged_weight() - w).norm() < (plain - w).norm()
