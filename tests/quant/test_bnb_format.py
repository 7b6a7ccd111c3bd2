"""4-bit checkpoints: our files in transformers/bitsandbytes' layout round-trip, and bitsandbytes reads them."""

import json

import pytest
import torch

import rankdial as rd
from rankdial.quant.bnb_format import (CheckpointError, load_quantized, nf4_from_tensors, quant_state_tensors,
                                       save_quantized)
from rankdial.atomic import MARKER
from rankdial.quant.linear import NF4Linear, set_fused_inference
from rankdial.quant.nf4 import dequantize_nf4
from conftest import model_output, tiny_model, token_batch

F = pytest.importorskip("bitsandbytes.functional")


def test_save_and_load_a_quantized_model_round_trips(tmp_path):
    model = tiny_model("llama")
    rd.quantize_model(model)
    save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    loaded = load_quantized(tmp_path / "q")
    assert isinstance(loaded.model.layers[1].mlp.down_proj, NF4Linear)
    for m in (model, loaded):
        set_fused_inference(m, False)
    ids = token_batch()
    assert torch.equal(model_output(loaded, ids), model_output(model, ids))


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_serialization_reads_in_rankdial(double_quant):
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    tensors = {"layer.weight": packed, **{f"layer.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    ours = nf4_from_tensors("layer", tensors)
    assert torch.equal(dequantize_nf4(ours), F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("double_quant", [False, True])
def test_rankdial_serialization_reads_in_bitsandbytes(double_quant):
    torch.manual_seed(1)
    layer = NF4Linear.from_linear(torch.nn.Linear(256, 64), double_quant=double_quant)
    tensors = quant_state_tensors("layer", layer)
    state = F.QuantState.from_dict({k.removeprefix("layer.weight."): v for k, v in tensors.items()
                                    if k.startswith("layer.weight.")}, device=torch.device("cpu"))
    theirs = F.dequantize_4bit(tensors["layer.weight"], state)
    assert torch.equal(theirs, layer.dequantized_weight())


def test_inconsistent_or_incomplete_quant_state_is_refused(tmp_path):
    layer = NF4Linear.from_linear(torch.nn.Linear(128, 32))
    tensors = quant_state_tensors("fc", layer)
    missing = {k: v for k, v in tensors.items() if not k.endswith("absmax")}
    with pytest.raises(CheckpointError, match="missing 'fc.weight.absmax'"):
        nf4_from_tensors("fc", missing)
    short = {**tensors, "fc.weight.absmax": tensors["fc.weight.absmax"][:-1]}
    with pytest.raises(CheckpointError, match="absmax has 63 values.*needs 64"):
        nf4_from_tensors("fc", short)
    half = {k: v for k, v in tensors.items() if "nested_absmax" not in k}
    with pytest.raises(CheckpointError, match="double quantization is half there"):
        nf4_from_tensors("fc", half)
    model = tiny_model("llama")
    rd.quantize_model(model)
    save_quantized(model, tmp_path / "q")
    file = tmp_path / "q" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_quantized(tmp_path / "q")


def test_save_replaces_only_its_own_folders_old_ones_included(tmp_path):
    model = tiny_model("llama")
    rd.quantize_model(model)
    target = save_quantized(model, tmp_path / "q")
    save_quantized(model, target)  # its own marker: replaced
    (target / MARKER).unlink()  # as save_quantized wrote it before rankdial marked its folders
    save_quantized(model, target)
    assert (target / MARKER).is_file()
    (target / MARKER).unlink()
    (target / "notes.txt").write_text("mine")  # a user's file: not rankdial's folder any more
    with pytest.raises(rd.OutputError, match=r"holds \[.notes.txt.\], which rankdial did not write"):
        save_quantized(model, target)
    assert (target / "notes.txt").read_text() == "mine"
    theirs = tmp_path / "transformers"  # what transformers + BitsAndBytesConfig writes: more config keys
    theirs.mkdir()
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"].update(llm_int8_threshold=6.0, bnb_4bit_quant_storage="uint8")
    (theirs / "config.json").write_text(json.dumps(config))
    (theirs / "model.safetensors").write_bytes((target / "model.safetensors").read_bytes())
    with pytest.raises(rd.OutputError, match="rankdial did not write it"):
        save_quantized(model, theirs)
    assert json.loads((theirs / "config.json").read_text()) == config
