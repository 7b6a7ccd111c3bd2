"""init_lora_weights (lora/init.py) held to PEFT on the same weights and seed where PEFT is deterministic, and
to each scheme's defining property; PiSSA/OLoRA folders converted as PEFT converts them."""

import copy
import json

import pytest
import torch
from torch import nn

import rankdial as rd
from rankdial.errors import AdapterFileError, ConfigError
from rankdial.lora import LoraLayer, lora_layers
from rankdial.lora.init import loftq_errors, pissa
from rankdial.quant.nf4 import dequantize_nf4
from conftest import model_output, tiny_model, token_batch

peft = pytest.importorskip("peft")

T = ["q_proj", "v_proj", "down_proj"]
TOL = dict(rtol=1e-5, atol=1e-5)


def both(init, seed=3, **extra):
    base = tiny_model("llama")
    ours = copy.deepcopy(base)
    torch.manual_seed(seed)
    rd.inject(ours, rd.LoraConfig(r=4, lora_alpha=8, target_modules=T, init_lora_weights=init, **extra))
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=T,
                                                                      init_lora_weights=init, **extra))
    return base, ours, theirs


@pytest.mark.parametrize("init", [True, "gaussian", "pissa", "pissa_niter_2", "olora"])
def test_every_weight_equals_peft_on_the_same_seed(init):
    """A, B and (for PiSSA/OLoRA) the residual base weight: PEFT's values, on the same weights and seed."""
    base, ours, theirs = both(init)
    their = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, their["base_model.model." + name], **TOL, msg=name)
    ids = token_batch()  # and every one of them starts where the base model is
    torch.testing.assert_close(model_output(ours, ids), model_output(base, ids), **TOL)


def test_pissa_takes_the_principal_singular_directions():
    torch.manual_seed(0)
    w = torch.randn(24, 40)
    A, B = pissa(w, 5, 0.5)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(0.5 * B @ A, U[:, :5] @ torch.diag(S[:5]) @ Vh[:5], **TOL)


def test_pissa_on_conv1d_keeps_the_layer_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 20)  # weight (d_in, d_out) = (20, 12)
    original = conv.weight.detach().clone()
    layer = LoraLayer(conv)
    layer.add_adapter("p", 3, 3.0, init_lora_weights="pissa")
    torch.testing.assert_close(layer.base_layer.weight + layer.delta_weight("p"), original, **TOL)
    layer.delete_adapter("p")  # the principal part goes back into the base
    torch.testing.assert_close(conv.weight, original, **TOL)


def train_a_little(model):
    """A pretend training step: move every A and B, so conversion has something to convert."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_saved_by_default_in_converted_form_that_peft_and_rankdial_run_on_the_original_base(init, tmp_path):
    base, ours, theirs = both(init)
    train_a_little(ours)
    ids = token_batch()
    trained = model_output(ours, ids)
    rd.save_adapter(ours, tmp_path / "conv")
    cfg = json.loads((tmp_path / "conv" / "adapter_config.json").read_text())
    assert (cfg["init_lora_weights"], cfg["r"], cfg["lora_alpha"]) == (True, 8, 16)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "conv").eval()
    torch.testing.assert_close(model_output(loaded, ids), trained, **TOL)
    back = copy.deepcopy(base)
    rd.load_adapter(back, tmp_path / "conv")
    torch.testing.assert_close(model_output(back, ids), trained, **TOL)
    # PEFT's own conversion of the same training gives the same tensors
    theirs.save_pretrained(tmp_path / "init")  # PEFT's recipe: the initial adapter, saved before training
    peft.set_peft_model_state_dict(theirs, rd.adapter_state_dict(ours))
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    from safetensors.torch import load_file

    mine, peft_own = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("conv", "peft"))
    assert set(mine) == set(peft_own)
    for key in mine:
        torch.testing.assert_close(mine[key], peft_own[key], **TOL, msg=key)


def test_unconverted_form_only_on_request_marked_and_refused_on_a_plain_load(tmp_path):
    base, ours, _ = both("pissa")
    train_a_little(ours)
    ids = token_batch()
    rd.save_adapter(ours, tmp_path / "res", residual_base=True)
    assert json.loads((tmp_path / "res" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    with pytest.raises(AdapterFileError, match="residual base pissa left.*residual_base=True"):
        rd.load_adapter(copy.deepcopy(base), tmp_path / "res")
    residual = copy.deepcopy(ours)
    for _, layer in lora_layers(residual):
        layer.initial_factors.clear()  # forget A₀, B₀: unload then leaves the residual base
    rd.unload(residual)
    rd.load_adapter(residual, tmp_path / "res", residual_base=True)
    torch.testing.assert_close(model_output(residual, ids), model_output(ours, ids), **TOL)


def test_loftq_starts_closer_to_the_full_precision_model_than_plain_qlora():
    base = tiny_model("llama")
    model = copy.deepcopy(base)
    rd.inject(model, rd.LoraConfig(r=4, lora_alpha=8, target_modules=T, init_lora_weights="loftq",
                                   loftq_config={"loftq_bits": 4, "loftq_iter": 2}))
    for path, layer in lora_layers(model):
        w = base.get_submodule(path).weight
        start = layer.merged_weight()  # deq(Q) + s·BA
        plain = dequantize_nf4(rd.quant.nf4.quantize_nf4(w.detach()), torch.float32)
        assert (start - w).norm() < (plain - w).norm(), path
    errors = loftq_errors(base.get_submodule("model.layers.0.mlp.down_proj").weight, r=4)
    assert errors["loftq"] < errors["qlora"]


@pytest.mark.parametrize("bad, message", [
    (dict(init_lora_weights="pisa"), "is not one rankdial knows; choose one of True, False, 'gaussian', 'pissa'"),
    (dict(init_lora_weights="pissa_niter_x"), "pissa_niter_K"),
    (dict(init_lora_weights="loftq"), "needs loftq_config"),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 8}), "4-bit NF4 only"),
    (dict(loftq_config={"loftq_bits": 4}), "set init_lora_weights='loftq'"),
    (dict(init_lora_weights="pissa", use_dora=True), "use_dora with init_lora_weights='pissa'"),
])
def test_bad_init_settings_are_one_line_errors(bad, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rd.LoraConfig(**bad)


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_residual_init_on_an_nf4_base_says_why(init):
    model = tiny_model("llama")
    rd.quantize_model(model)
    extra = {"loftq_config": {"loftq_bits": 4}} if init == "loftq" else {}
    with pytest.raises(ConfigError, match="on a 4-bit NF4 base: .*(full-precision|quantizes the base itself)"):
        rd.inject(model, rd.LoraConfig(r=2, target_modules=T, init_lora_weights=init, **extra))
    assert not list(lora_layers(model))  # refused before the model was touched


@pytest.mark.parametrize("field, value", [("init_lora_weights", "corda"), ("init_lora_weights", "mica"),
                                          ("lora_bias", True)])
def test_a_peft_folder_with_a_method_rankdial_lacks_names_field_and_value(tmp_path, field, value):
    model = tiny_model("llama")
    rd.inject(model, rd.LoraConfig(r=2, target_modules=T))
    rd.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg[field] = value
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match=f"{field}.*{value!r}"):
        rd.load_adapter(tiny_model("llama"), tmp_path / "a")


def test_a_layer_with_adapters_refuses_a_residual_init():
    layer = LoraLayer(nn.Linear(8, 8))
    layer.add_adapter("a", 2, 2.0)
    with pytest.raises(ConfigError, match="already holds adapters"):
        layer.add_adapter("p", 2, 2.0, init_lora_weights="pissa")


def test_a_loftq_folder_loads_on_the_full_precision_model_by_rebuilding_its_base(tmp_path):
    base = tiny_model("llama")
    model = copy.deepcopy(base)
    rd.inject(model, rd.LoraConfig(r=4, lora_alpha=8, target_modules=T, init_lora_weights="loftq",
                                   loftq_config={"loftq_bits": 4, "loftq_iter": 1}))
    train_a_little(model)
    rd.save_adapter(model, tmp_path / "q")
    back = copy.deepcopy(base)
    rd.load_adapter(back, tmp_path / "q")
    ids = token_batch()
    torch.testing.assert_close(model_output(back, ids), model_output(model, ids), **TOL)
    quantized = copy.deepcopy(base)
    rd.quantize_model(quantized)  # LoftQ's base cannot be rebuilt from a quantized model: said in one line
    with pytest.raises(ConfigError, match="loftq.*on a 4-bit NF4 base"):
        rd.load_adapter(quantized, tmp_path / "q")


def test_run_config_keys_and_their_method_checks(tmp_path):
    from rankdial.train import make_config
    from rankdial.train.config import parse_flag_value

    toml = tmp_path / "run.toml"
    toml.write_text('data = "d.jsonl"\n[lora]\nuse_dora = true\ninit_lora_weights = "gaussian"\n')
    cfg = make_config(toml)
    assert cfg.lora.use_dora and cfg.lora.init_lora_weights == "gaussian"
    assert parse_flag_value("init_lora_weights", "false") is False
    assert parse_flag_value("loftq_config", '{"loftq_bits": 4}') == {"loftq_bits": 4}
    loftq = dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    assert make_config(data="d.jsonl", method="qlora", **loftq).lora.init_lora_weights == "loftq"
    with pytest.raises(ConfigError, match="LoftQ initialises against a 4-bit NF4 base"):
        make_config(data="d.jsonl", method="lora", **loftq)
    with pytest.raises(ConfigError, match="'pissa' with method='qlora': pissa needs the full-precision weight"):
        make_config(data="d.jsonl", method="qlora", init_lora_weights="pissa")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unload_gives_back_the_original_base(init):
    base, ours, _ = both(init)
    train_a_little(ours)
    ids = token_batch()
    torch.testing.assert_close(model_output(rd.unload(ours), ids), model_output(base, ids), **TOL)
