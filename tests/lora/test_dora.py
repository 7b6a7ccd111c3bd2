"""DoRA (lora/dora.py) held to Hugging Face PEFT's DoRA on the same base and adapter weights, and to itself:
the fused composition equals the reference form, the expanded row norm equals the formed one."""

import copy
import logging

import pytest
import torch
from torch import nn

import rankdial as rd
from rankdial.errors import AdapterFileError, MergeError, TargetError
from rankdial.lora import LoraLayer, lora_layers
from rankdial.lora import dora
from rankdial.quant.linear import NF4Linear
from conftest import make_model_dir, model_output, tiny_model, token_batch

peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-5, atol=1e-5)
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def logits(model, ids):
    """The model's logits with autograd recording (conftest.model_output runs without it)."""
    return model(input_ids=ids).logits


def randomize(model, seed=5):
    """Random A, B and a magnitude off its initial norm (the defaults would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))


def pair(kind="llama", dropout=0.0):
    """(ours, PEFT's) DoRA models on the same base holding the same adapter weights."""
    base = tiny_model(kind)
    ours = copy.deepcopy(base)
    rd.inject(ours, rd.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS[kind], use_dora=True))
    randomize(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS[kind], use_dora=True,
        fan_in_fan_out=kind == "gpt2"))
    result = peft.set_peft_model_state_dict(theirs, rd.adapter_state_dict(ours))
    assert not result.unexpected_keys
    return base, ours, theirs


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_forward_and_backward_equal_peft(kind):
    _, ours, theirs = pair(kind)  # eval mode: GPT-2's own dropouts stay off; autograd records all the same
    ids = token_batch()
    out, ref = logits(ours, ids), logits(theirs, ids)
    torch.testing.assert_close(out, ref, **TOL)
    out.square().mean().backward()
    ref.square().mean().backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    their_grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(their_grads) and any("magnitude" in n for n in ours_grads)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, their_grads[name], **TOL, msg=name)


def test_forward_with_dropout_equals_peft_under_the_same_mask():
    _, ours, theirs = pair(dropout=0.3)
    ours.train(), theirs.train()
    ids = token_batch()
    torch.manual_seed(11)
    out = model_output(ours, ids)
    torch.manual_seed(11)
    torch.testing.assert_close(out, model_output(theirs, ids), **TOL)


def layer_with(base, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = LoraLayer(base)
    layer.add_adapter("d", 3, 6.0, dropout=dropout, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector["d"].weight.mul_(1.1)
    layer.set_active(["d"])
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_fused_composition_equals_reference_form(bias):
    layer = layer_with(nn.Linear(16, 12, bias=bias).requires_grad_(False)).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    assert layer._fusable(x)
    out = layer(x)
    out.square().sum().backward()
    fast = [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    ref = layer.reference_forward(x, ("d",))
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, **TOL)
    for a, b in zip(fast, [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]):
        torch.testing.assert_close(a, b, **TOL)


def test_the_norm_is_detached_as_in_the_paper():
    """d out / d m = (W₀x + s·BAx)/n with n constant: the gradient of m is exactly that, not the full chain."""
    layer = layer_with(nn.Linear(8, 6, bias=False).requires_grad_(False))
    x = torch.randn(4, 8)
    layer(x).sum().backward()
    A, B, s = layer.lora_A["d"].weight, layer.lora_B["d"].weight, layer.scaling["d"]
    direction = x @ (layer.base_layer.weight + s * B @ A).t()  # (4, 6)
    torch.testing.assert_close(layer.lora_magnitude_vector["d"].weight.grad,
                               (direction / layer.dora_norm("d")).sum(0).detach(), **TOL)


@pytest.mark.parametrize("base", ["dense", "conv1d", "nf4"])
def test_expanded_row_norm_equals_the_formed_one(base):
    torch.manual_seed(0)
    linear = nn.Linear(128, 40)
    if base == "conv1d":
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D(40, 128)
        conv.weight.data = linear.weight.data.t().contiguous()
        linear = conv
    elif base == "nf4":
        linear = NF4Linear.from_linear(linear)
    A, B = torch.randn(5, 128), torch.randn(40, 5)
    torch.testing.assert_close(dora.row_norm(linear, A, B, 0.7), dora.row_norm_reference(linear, A, B, 0.7),
                               rtol=1e-5, atol=1e-5)


def test_nf4_base_computes_what_the_dequantized_base_computes():
    """QDoRA: on an NF4 base the layer equals the same DoRA on the dense dequantized weight."""
    torch.manual_seed(0)
    nf4 = NF4Linear.from_linear(nn.Linear(128, 64))
    dense = nn.Linear(128, 64)
    dense.weight.data, dense.bias.data = nf4.dequantized_weight(torch.float32), nf4.bias.data.clone()
    q, d = layer_with(nf4).train(), layer_with(dense.requires_grad_(False)).train()
    torch.testing.assert_close(q.lora_magnitude_vector["d"].weight, d.lora_magnitude_vector["d"].weight, **TOL)
    x = torch.randn(3, 128)
    torch.testing.assert_close(q(x), d(x), **TOL)
    with torch.no_grad():
        torch.testing.assert_close(q.eval()(x), d.eval()(x), **TOL)


def test_qdora_on_an_nf4_model_trains_the_magnitude():
    model = tiny_model("llama")
    rd.quantize_model(model)
    rd.inject(model, rd.LoraConfig(r=4, target_modules=TARGETS["llama"], use_dora=True))
    before = model_output(model, token_batch()).detach()
    params = [p for p in model.parameters() if p.requires_grad]
    assert any(p.ndim == 1 for p in params)
    model.train()
    logits(model, token_batch()).square().mean().backward()
    assert all(p.grad is not None for p in params)
    plain = tiny_model("llama")
    rd.quantize_model(plain)  # the adapter starts as a no-op (m = ‖W₀‖ per row, B = 0)
    torch.testing.assert_close(before, model_output(plain, token_batch()), **TOL)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_and_unmerge_equal_peft(kind):
    base, ours, theirs = pair(kind)
    ids = token_batch()
    expected = model_output(ours, ids)
    rd.merge(ours)
    theirs.merge_adapter()
    for path, layer in lora_layers(ours):
        their = theirs.base_model.model.get_submodule(path).base_layer.weight
        torch.testing.assert_close(layer.base_layer.weight, their, **TOL, msg=path)
    torch.testing.assert_close(model_output(ours, ids), expected, **TOL)
    rd.unmerge(ours)
    for (path, layer), original in zip(lora_layers(ours), [base.get_submodule(p) for p, _ in lora_layers(ours)]):
        torch.testing.assert_close(layer.base_layer.weight, original.weight, **TOL, msg=path)
    merged = rd.merge_and_unload(copy.deepcopy(ours))
    torch.testing.assert_close(model_output(merged, ids), model_output(theirs.merge_and_unload(), ids), **TOL)


def test_merged_weight_of_dora_with_another_adapter_equals_the_forward():
    layer = layer_with(nn.Linear(16, 12).requires_grad_(False))
    layer.add_adapter("plain", 2, 4.0, init_lora_weights=False)
    layer.set_active(["plain", "d"])
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(x @ layer.merged_weight().t() + layer.base_layer.bias, layer(x), **TOL)
    with pytest.raises(MergeError, match="merges only alone"):
        layer.merge()


def test_files_both_ways(tmp_path):
    base, ours, theirs = pair()
    ids = token_batch()
    rd.save_adapter(ours, tmp_path / "ours")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(model_output(loaded, ids), model_output(ours, ids), **TOL)
    randomize(theirs, seed=9)
    theirs.save_pretrained(tmp_path / "peft")
    back = copy.deepcopy(base)
    config = rd.load_adapter(back, tmp_path / "peft")
    assert config.use_dora
    torch.testing.assert_close(model_output(back, ids), model_output(theirs.eval(), ids), **TOL)


def test_a_dora_file_without_use_dora_is_refused(tmp_path):
    _, ours, _ = pair()
    rd.save_adapter(ours, tmp_path / "a")
    import json

    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match="use_dora false"):
        rd.load_adapter(tiny_model("llama"), tmp_path / "a")


def test_use_dora_on_a_module_it_does_not_cover_names_it():
    class Odd(nn.Module):  # a linear-like layer of a kind DoRA's norm cannot read
        in_features, out_features = 4, 4

        def dequantized_weight(self, dtype=None):
            return torch.eye(4)

    with pytest.raises(TargetError, match="use_dora does not cover Odd at m.odd"):
        dora.check_base(Odd(), "m.odd")


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_base_equals_peft(tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = make_model_dir(tmp_path / "m", hidden=64)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") if bits == 4 else \
        BitsAndBytesConfig(load_in_8bit=True)

    def load():
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu").eval()

    ours = load()
    rd.inject(ours, rd.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], use_dora=True))
    randomize(ours)
    theirs = peft.get_peft_model(load(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"],
                                                         use_dora=True))
    peft.set_peft_model_state_dict(theirs, rd.adapter_state_dict(ours))
    ids = token_batch(vocab=4096)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_rescale_that_keeps_the_output_equals_the_plain_one(bias):
    torch.manual_seed(0)
    h = torch.randn(2, 5, 12, requires_grad=True)
    m = (torch.rand(12) + 0.5).requires_grad_()
    n, b = torch.rand(12) + 0.5, (torch.randn(12) if bias else None)
    base = nn.Linear(3, 12, bias=bias)
    if bias:
        base.bias.data = b
    out = dora.rescale(base, h, m, n)
    assert out.grad_fn.name().endswith("_RescaleBackward")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (h, m), g)
    ref = dora.rescale_reference(h, m, n, b)
    torch.testing.assert_close(out, ref, **TOL)
    for a, r in zip(grads, torch.autograd.grad(ref, (h, m), g)):
        torch.testing.assert_close(a, r, **TOL)


def test_trainable_parameters_counts_the_magnitudes_as_peft_does():
    _, ours, theirs = pair()
    report = rd.trainable_parameters(ours)
    their = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert report.trainable == their == sum(n for _, _, n in report.rows)
    assert all("DoRA" in what for _, what, _ in report.rows)


def test_the_cached_base_norm_follows_a_weight_written_in_place():
    """‖W₀‖² per row is cached across steps; writing W₀ (as merge does) must not leave a stale value."""
    base = nn.Linear(16, 12).requires_grad_(False)
    A, B = torch.randn(3, 16), torch.randn(12, 3)
    first = dora.row_norm(base, A, B, 0.5)
    torch.testing.assert_close(first, dora.row_norm_reference(base, A, B, 0.5), **TOL)
    with torch.no_grad():
        base.weight.mul_(2.0)
    torch.testing.assert_close(dora.row_norm(base, A, B, 0.5), dora.row_norm_reference(base, A, B, 0.5), **TOL)


def test_the_base_norm_follows_a_weight_written_through_data():
    """`weight.data.copy_(...)` (a common way user code loads weights) bumps neither the storage nor the version
    counter; the row norm must still be the new weight's (a cache keyed on those served the old one)."""
    base = nn.Linear(16, 12).requires_grad_(False)
    A, B = torch.randn(3, 16), torch.randn(12, 3)
    dora.row_norm(base, A, B, 0.5)
    base.weight.data.copy_(torch.randn(12, 16))
    torch.testing.assert_close(dora.row_norm(base, A, B, 0.5), dora.row_norm_reference(base, A, B, 0.5), **TOL)
