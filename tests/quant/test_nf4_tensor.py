"""ShardableNF4Linear: NF4 codes and scales as block-aligned parameters that FSDP can shard, values unchanged."""

import pytest
import torch

from rankdial.quant import NF4Linear, quantize_nf4
from rankdial.quant.nf4 import dequantize_nf4_reference
from rankdial.quant.nf4_tensor import ShardableNF4Linear, make_shardable


@pytest.mark.parametrize("shape,double_quant", [((48, 64), True), ((37, 50), True), ((33, 70), False)])
def test_dequantized_values_are_identical_to_the_unsharded_nf4_weight(shape, double_quant):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    layer = NF4Linear(quantize_nf4(w, 64, double_quant))
    shardable = ShardableNF4Linear.from_nf4_linear(layer)
    assert torch.equal(shardable.dequantized_weight(), layer.dequantized_weight())
    assert torch.equal(shardable.dequantized_weight(), dequantize_nf4_reference(layer.quantized))
    x = torch.randn(3, shape[1])
    assert torch.equal(shardable(x), layer(x))
    assert {n for n, _ in shardable.named_parameters()} == {"packed", "absmax"}
    assert not any(p.requires_grad for p in shardable.parameters())


@pytest.mark.parametrize("world", [2, 3])
def test_a_dim0_shard_holds_whole_blocks_with_their_own_scales(world):
    """FSDP splits dim 0 as torch.chunk does: each piece dequantizes to its slice of the whole weight."""
    torch.manual_seed(1)
    layer = ShardableNF4Linear(quantize_nf4(torch.randn(40, 96), 64, double_quant=False))
    whole = layer.dequantized_weight().reshape(-1)
    packed, absmax = layer.packed.chunk(world), layer.absmax.chunk(world)
    assert [p.shape[0] for p in packed] == [a.shape[0] for a in absmax]
    start = 0
    for p, a in zip(packed, absmax):
        codes = torch.stack([p.reshape(-1) >> 4, p.reshape(-1) & 15], 1).reshape(-1).long()
        from rankdial.quant.nf4 import NF4_CODE

        values = (NF4_CODE[codes].view(-1, 64) * a.unsqueeze(1)).reshape(-1)
        n = min(values.numel(), whole.numel() - start)
        assert torch.equal(values[:n], whole[start:start + n])
        start += values.numel()


def test_make_shardable_swaps_nf4_layers_inside_lora_wrappers(llama):
    from rankdial import LoraConfig
    from rankdial.lora import inject
    from rankdial.quant import quantize_model

    quantize_model(llama)
    inject(llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        before = llama(input_ids=ids).logits
    n = make_shardable(llama)
    assert n == 14 and not any(type(m) is NF4Linear for m in llama.modules())
    with torch.no_grad():
        assert torch.equal(llama(input_ids=ids).logits, before)


def test_an_older_torch_whose_fsdp_cannot_shard_the_codes_is_refused_in_one_line(monkeypatch):
    """torch 2.11's fully_shard made every shard requires_grad=True and failed on the uint8 codes with a stack
    trace (seen on a CUDA machine); such a torch gets a one-line ConfigError naming the version and the fix."""
    import rankdial as rd
    from rankdial.errors import ConfigError
    from rankdial.quant import nf4_tensor

    assert nf4_tensor.fsdp_keeps_frozen_integers("2.13.0+cpu") and nf4_tensor.fsdp_keeps_frozen_integers("3.0.1")
    assert not nf4_tensor.fsdp_keeps_frozen_integers("2.11.0+cu130")
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    rd.quantize_model(model, skip=[])
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    with pytest.raises(ConfigError, match=r"needs torch >= 2.13 \(this is 2.11.0\+cu130") as err:
        nf4_tensor.make_shardable(model)
    assert "\n" not in str(err.value)
