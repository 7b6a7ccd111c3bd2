"""NF4Linear and QLoRA: exact agreement with dense math on the dequantized weight, adapters that train on a
4-bit base, honest merging, and the bitsandbytes kernel held to the pure path."""

import copy

import pytest
import torch
from torch import nn

import rankdial as rd
from rankdial.quant import kernels
from rankdial.quant import linear as qlinear
from rankdial.quant.linear import NF4Linear, set_fused_inference
from conftest import model_output, tiny_model, token_batch


def dense_and_nf4(d_in=128, d_out=96, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    dense = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    return dense, NF4Linear.from_linear(dense)


TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # chunked vs one matmul, per dtype
# (d_in, d_out): blocks within rows (bitsandbytes' kernel applies), blocks straddling rows, odd sizes, one row
SHAPES = [(128, 96), (64, 256), (100, 30), (33, 7), (250, 45), (1000, 1)]


@pytest.mark.parametrize("kernel", ["torch", "bitsandbytes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("d_in,d_out", SHAPES)
def test_forward_and_input_grad_equal_dense_math_on_the_dequantized_weight(kernel, d_in, d_out, bias, dtype,
                                                                           monkeypatch):
    if kernel == "bitsandbytes":
        pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(kernels, "_KERNEL", kernel)
    monkeypatch.setattr(qlinear, "CHUNK_ELEMENTS", 2048)  # several chunks even for small weights
    seed = SHAPES.index((d_in, d_out)) * 6 + 2 * bias + [torch.float32, torch.float16, torch.bfloat16].index(dtype)
    dense, q = dense_and_nf4(d_in, d_out, bias, seed, dtype)  # a different weight and input for every case
    assert q.weight.dtype == dtype
    w = q.dequantized_weight()
    x = torch.randn(3, 5, d_in, dtype=dtype).requires_grad_()
    assert w.abs().sum() > 0 and x.abs().sum() > 0
    out = q(x)
    assert out.dtype == dtype
    expected = torch.nn.functional.linear(x, w, dense.bias)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(gx, g @ w, rtol=tol, atol=tol)


def test_fp32_inference_is_fp32_by_default_even_where_the_fused_bf16_kernel_exists(monkeypatch):
    """An fp32 layer in eval mode must not switch to bf16 arithmetic because the CPU has AVX512-BF16. The fused
    kernel is replaced by a marker so that this holds (and can fail) on every CPU, not only on such CPUs."""
    calls = []

    def fake_pack(*args):
        def matmul(x, *_, **__):
            calls.append(x.dtype)
            return torch.zeros(x.shape[0], 64, dtype=x.dtype)
        return matmul, None, None

    monkeypatch.setattr(kernels, "fused_cpu", lambda: object())
    monkeypatch.setattr(kernels, "pack_for_fused", fake_pack)
    dense, q = dense_and_nf4(256, 64, seed=21)
    q.eval()
    x = torch.randn(16, 256)
    with torch.no_grad():
        out = q(x)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, q.dequantized_weight(), dense.bias),
                                   rtol=1e-6, atol=1e-6)
        assert calls == []
        q.compute_dtype = torch.bfloat16  # computing in bf16 anyway: the fused kernel may run
        q(x)
        assert calls == [torch.bfloat16]
        q.compute_dtype = None
        set_fused_inference(q, True)  # the explicit opt-in
        q(x)
        assert calls == [torch.bfloat16, torch.float32]
        set_fused_inference(q, False)
        q.compute_dtype = torch.bfloat16
        q(x)
        assert len(calls) == 2


@pytest.mark.skipif(kernels.fused_cpu() is None,
                    reason="this CPU has no AVX512-BF16 (or bitsandbytes is missing): no fused kernel to compare")
def test_fused_cpu_inference_path_stays_within_bf16_of_the_fp32_reference():
    dense, q = dense_and_nf4(256, 64, seed=4)
    q.eval()
    set_fused_inference(q, True)
    x = torch.randn(16, 256)
    with torch.no_grad():
        fast = q(x)
    assert q._fused is not None  # the fused kernel ran
    reference = torch.nn.functional.linear(x.double(), q.dequantized_weight(torch.float64), dense.bias.double())
    torch.testing.assert_close(fast.double(), reference, rtol=3e-2, atol=3e-2)
    q.train()
    assert q._fused is None  # the bf16 layout is dropped when training resumes


def test_bf16_compute_dtype_casts_back():
    dense, _ = dense_and_nf4()
    q = NF4Linear.from_linear(dense, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 128)
    out = q(x)
    assert out.dtype == torch.float32
    expected = torch.nn.functional.linear(x.bfloat16(), q.dequantized_weight(torch.bfloat16), dense.bias.bfloat16())
    torch.testing.assert_close(out, expected.float(), rtol=2e-2, atol=1e-2)  # bf16 rounding of the sum


def test_quantize_model_skips_head_and_reports_bytes(llama):
    report = rd.quantize_model(llama)
    assert len(report.layers) == 14 and report.skipped == ["lm_head"] and report.reasons == {"lm_head": "output head"}
    assert isinstance(llama.model.layers[0].self_attn.q_proj, NF4Linear)
    assert isinstance(llama.lm_head, nn.Linear)
    assert report.bytes_after < report.bytes_before / 6
    assert report.bits_per_param < 4.2  # tiny layers: each also keeps one fp32 scale and offset (4.127 at scale)
    assert "quantized 14 linear layers" in str(report)


def test_quantize_model_handles_gpt2_conv1d():
    model = tiny_model("gpt2")
    ids = token_batch()
    before = model_output(model, ids)
    rd.quantize_model(model)
    after = model_output(model, ids)
    assert (after - before).abs().mean() < 0.1 * before.abs().mean()  # a 4-bit copy, not a different model


def test_lora_on_nf4_equals_lora_on_the_dequantized_weight(llama):
    rd.quantize_model(llama)
    set_fused_inference(llama, False)  # the exact fp32 path (the fused one computes in bf16)
    dense = copy.deepcopy(llama)
    for name, module in list(dense.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, NF4Linear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.weight.data.copy_(child.dequantized_weight())
                setattr(module, child_name, plain)
    for model in (llama, dense):
        rd.inject(model, rd.LoraConfig(r=4, init_lora_weights=False))
        torch.manual_seed(9)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape) * 0.1)
    ids = token_batch()
    torch.testing.assert_close(model_output(llama, ids), model_output(dense, ids), rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_adapters(llama):
    rd.quantize_model(llama)
    rd.inject(llama, rd.LoraConfig(r=4))
    ids = token_batch()
    llama(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in llama.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in llama.named_parameters() if ".lora_" in n}
    assert all(b.grad is None for b in llama.buffers())


def train(model, steps=40, lr=1e-2):
    ids = token_batch(batch=2, length=12)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_qlora_lowers_the_loss_like_lora():
    lora, qlora = tiny_model("llama"), tiny_model("llama")
    rd.quantize_model(qlora)
    for model in (lora, qlora):  # the tiny model's 0.02-scale head caps its logits: train the head too
        rd.inject(model, rd.LoraConfig(r=8, lora_alpha=16, modules_to_save=["lm_head"]))
    lora_losses, qlora_losses = train(lora), train(qlora)
    print(f"LoRA loss {lora_losses[0]:.3f} -> {lora_losses[-1]:.3f}, QLoRA {qlora_losses[0]:.3f} -> {qlora_losses[-1]:.3f}")
    assert lora_losses[-1] < 0.5 * lora_losses[0]
    assert qlora_losses[-1] < 0.5 * qlora_losses[0]
    # same data, same init: the 4-bit base ends within 15% of the full-precision run
    assert abs(qlora_losses[-1] - lora_losses[-1]) < 0.15 * lora_losses[-1]


def test_qlora_adapter_loads_in_peft_on_the_dense_base(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_model("llama")
    q = copy.deepcopy(base)
    rd.quantize_model(q)
    rd.inject(q, rd.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    train(q, steps=5)
    rd.save_adapter(q, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    ours = copy.deepcopy(base)
    rd.load_adapter(ours, tmp_path / "a")
    ids = token_batch()
    torch.testing.assert_close(model_output(theirs, ids), model_output(ours, ids), rtol=0, atol=1e-5)


def test_merging_onto_a_4bit_base(llama):
    rd.quantize_model(llama)
    set_fused_inference(llama, False)
    rd.inject(llama, rd.LoraConfig(r=4, init_lora_weights=False))
    ids = token_batch()
    expected = model_output(llama, ids)
    with pytest.raises(rd.MergeError, match="merge_and_unload"):
        rd.merge(llama)
    twin = copy.deepcopy(llama)
    merged = rd.merge_and_unload(llama)
    assert not any(isinstance(m, (NF4Linear, rd.LoraLayer)) for m in merged.modules())
    torch.testing.assert_close(model_output(merged, ids), expected, rtol=1e-5, atol=1e-5)
    requantized, report = rd.merge_and_requantize(twin)
    linears = {p: m for p, m in requantized.named_modules() if isinstance(m, (nn.Linear, NF4Linear))}
    assert {p for p, m in linears.items() if not isinstance(m, NF4Linear)} == {"lm_head"}
    assert len(linears) == 15 and len(report.rows) == 14 and 0 < report.max_relative_error < 0.15
    assert "re-quantized 14 merged layers" in str(report)


def test_layer_types_that_cannot_be_quantized_are_named():
    with pytest.raises(rd.RankdialError, match="cannot quantize a Embedding"):
        NF4Linear.from_linear(nn.Embedding(10, 4))


def test_qlora_adapter_reloads_onto_a_fresh_quantized_base(tmp_path):
    base = tiny_model("llama")
    trained = copy.deepcopy(base)
    rd.quantize_model(trained)
    rd.inject(trained, rd.LoraConfig(r=4, init_lora_weights=False))
    rd.save_adapter(trained, tmp_path / "a")
    fresh = copy.deepcopy(base)
    rd.quantize_model(fresh)
    rd.load_adapter(fresh, tmp_path / "a")
    ids = token_batch()
    assert torch.equal(model_output(fresh, ids), model_output(trained, ids))


def test_parameter_report_counts_4bit_weights(llama):
    total = sum(p.numel() for p in llama.parameters())
    rd.quantize_model(llama.eval())
    assert not any(m.training for m in llama.modules() if isinstance(m, NF4Linear))  # mode carried over
    rd.inject(llama, rd.LoraConfig(r=2))
    report = rd.trainable_parameters(llama)
    assert report.total == total + report.trainable


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_answers_dtype_shape_and_device_and_dequantizes(dtype):
    dense, q = dense_and_nf4(128, 48, seed=31, dtype=dtype)
    w = q.weight
    assert (w.dtype, w.shape, w.device, w.ndim) == (dtype, torch.Size((48, 128)), torch.device("cpu"), 2)
    assert (w.size(), w.size(1), w.numel(), w.requires_grad) == (torch.Size((48, 128)), 128, 48 * 128, False)
    assert w.dequantize().dtype == dtype and torch.equal(w.dequantize(), q.dequantized_weight())
    assert w.dequantize(torch.float32).sub(dense.weight.float()).abs().max() < 0.2 * dense.weight.abs().max()
    assert isinstance(q.bias, nn.Parameter) and not q.bias.requires_grad
    with pytest.raises(AttributeError):
        q.weight = torch.zeros(48, 128)  # frozen: read-only


def test_model_dtype_weight_probes_and_generate_work_after_quantize_model(llama):
    ids = token_batch()
    rd.quantize_model(llama)
    assert llama.dtype == torch.float32
    probes = {n: (m.weight.dtype, tuple(m.weight.shape), m.weight.device.type)
              for n, m in llama.named_modules() if hasattr(m, "weight")}
    assert probes["model.layers.0.mlp.up_proj"] == (torch.float32, (64, 32), "cpu")
    dense = copy.deepcopy(llama)
    for name, module in list(dense.named_modules()):
        if isinstance(module, NF4Linear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight.data.copy_(module.weight.dequantize())
            dense.set_submodule(name, plain)
    ours = llama.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    theirs = dense.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert ours.shape == (2, 12) and torch.equal(ours, theirs)


def test_multihead_attention_out_proj_is_kept_in_full_precision_and_reported():
    from conftest import MHABlock

    torch.manual_seed(41)
    block = MHABlock(64, 4, linear="ff").eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        before = block(x)
    report = rd.quantize_model(block)
    assert report.layers == ["ff"] and report.skipped == ["attn.out_proj"]
    assert "MultiheadAttention" in report.reasons["attn.out_proj"] and "attn.out_proj (out_proj of" in str(report)
    assert type(block.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with torch.no_grad():
        after = block(x)  # MHA reads out_proj.weight as a tensor: still there
    assert (after - before).abs().mean() < 0.1 * before.abs().mean()
