"""The memory planner: its arithmetic, its refusals, and its agreement with peaks measured in fresh processes."""

import json

import pytest
import torch

from rankdial.errors import ConfigError
from rankdial.memory import LlamaShape, estimate_memory, lora_params, model_shape, nf4_bytes
from rankdial.memory_measure import measure_in_fresh_processes

GB = 10 ** 9
BIG = {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 4, "ffn": 2816, "vocab": 4096}


def test_70b_full_weights_in_16_bits():
    plan = estimate_memory("llama-70b", method="full")
    assert 125 * GB <= plan.weights_bytes <= 150 * GB
    assert plan.total_params == 68_976_648_192  # Llama-2-70B's published count
    assert plan.fits == []


def test_70b_qlora_fits_a_48_gb_card_at_a_small_batch():
    plan = estimate_memory("llama-70b", method="qlora", rank=16, batch_size=1, seq_len=512)
    assert plan.settings["gradient_checkpointing"] is True  # QLoRA's recipe, the default for the method
    assert 33 * GB <= plan.total_bytes <= 48 * GB
    assert plan.fits == [48, 80]
    bits = 8 * plan.weights_bytes / model_shape("llama-70b").total_params
    assert 4.1 < bits < 4.3  # 4.127 bits per quantized weight, plus the 16-bit embeddings and head
    no_ckpt = estimate_memory("llama-70b", method="qlora", gradient_checkpointing=False)
    assert no_ckpt.activations > 10 * plan.activations


def test_lora_arithmetic_4096_square_at_rank_16():
    assert lora_params(4096, 4096, 16) == 131_072
    assert round(100 * 131_072 / 4096 ** 2, 2) == 0.78
    plan = estimate_memory({"hidden": 4096, "layers": 1, "heads": 32, "kv_heads": 32, "ffn": 11008, "vocab": 32000},
                           targets=["q_proj"], rank=16)
    assert plan.trainable_params == 131_072


def test_parameter_counts_match_the_published_ones():
    assert estimate_memory("default", method="full").total_params == 4_458_752
    assert model_shape("llama-7b").total_params == 6_738_415_616
    assert model_shape("llama-13b").total_params == 13_015_864_320


@pytest.mark.slow  # imports transformers' Llama
def test_parameter_counts_match_built_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    for tied in (False, True):
        shape = LlamaShape(hidden=96, layers=2, heads=6, kv_heads=2, ffn=200, vocab=300, tied=tied)
        cfg = LlamaConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                          intermediate_size=200, vocab_size=300, tie_word_embeddings=tied)
        assert shape.total_params == sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())


def test_nf4_bytes_match_the_quantizer():
    from rankdial.quant import quantize_nf4

    for numel in (64 * 256 * 3, 1000 * 37):
        q = quantize_nf4(torch.randn(numel // 37 if numel % 37 == 0 else 1, 37 if numel % 37 == 0 else numel))
        codes, constants = nf4_bytes(numel)
        assert codes + constants == q.nbytes + q.nested_code.numel() * 4


def test_lora_and_checkpointing_shrink_the_bill():
    full = estimate_memory("llama-7b", method="full", batch_size=4, dtype="fp32")
    lora = estimate_memory("llama-7b", method="lora", batch_size=4, dtype="fp32")
    ckpt = estimate_memory("llama-7b", method="lora", batch_size=4, dtype="fp32", gradient_checkpointing=True)
    eight = estimate_memory("llama-7b", method="full", batch_size=4, dtype="fp32", optimizer="adamw-8bit")
    assert lora.optimizer < full.optimizer / 100 and lora.activations < full.activations
    # fp32 adapters on a bf16 base: each adapter keeps an fp32 copy of its input for backward
    mixed = estimate_memory("llama-7b", method="lora", dtype="bf16")
    same = estimate_memory("llama-7b", method="lora", dtype="bf16", adapter_dtype="bf16")
    assert mixed.activations > same.activations
    assert ckpt.activations < lora.activations / 5
    assert eight.optimizer < full.optimizer / 1.9
    assert 0.0 < lora.trainable_share < 0.01


def test_plan_serializes_and_prints():
    plan = estimate_memory("default", method="qlora", batch_size=2, seq_len=64)
    data = json.loads(json.dumps(plan.to_dict()))
    for key in ("weights", "quant_constants", "adapters", "gradients", "optimizer", "activations", "logits",
                "weights_bytes", "total_bytes", "trainable_params", "total_params", "trainable_share", "fits"):
        assert key in data
    assert data["total_bytes"] >= data["weights_bytes"] > 0 and data["quant_constants"] > 0
    assert "peak (planned)" in str(plan) and "fits on" in str(plan)


def test_a_config_folder_is_read(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 500,
           "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    plan = estimate_memory(tmp_path, method="full")
    assert plan.weights == 2 * LlamaShape(128, 2, 4, 2, 256, 500).total_params
    assert plan.settings["dtype"] == "bf16"


@pytest.mark.parametrize("kwargs, words", [
    (dict(rank=0), ["0", "1..256"]),
    (dict(rank=300), ["300", "1..256"]),
    (dict(model="llama-7"), ["'llama-7'", "did you mean 'llama-7b'"]),
    (dict(model={**BIG, "heads": 10}), ["heads=10", "hidden=1024"]),
    (dict(model={**BIG, "kv_heads": 3}), ["kv_heads=3", "heads=16"]),
    (dict(batch_size=0), ["batch_size", "0"]),
    (dict(seq_len=-5), ["seq_len", "-5"]),
    (dict(method="qlor"), ["'qlor'", "did you mean 'qlora'"]),
    (dict(optimizer="sgd"), ["'sgd'", "adamw-8bit"]),
    (dict(dtype="fp8"), ["'fp8'", "fp32, bf16, fp16"]),
    (dict(targets=["q_prj"]), ["'q_prj'", "did you mean 'q_proj'"]),
])
def test_bad_input_names_the_value_and_the_fix(kwargs, words):
    with pytest.raises(ConfigError) as err:
        estimate_memory(**{"model": "default", **kwargs})
    for word in words:
        assert word in str(err.value)


def test_a_config_that_is_not_a_llama_causal_lm_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_embd": 768}))
    with pytest.raises(ConfigError, match="no hidden_size, num_hidden_layers.*not a causal LM"):
        estimate_memory(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        estimate_memory(tmp_path / "config.json")


# Measured against the planner: CPU, fp32, AdamW, transformers' default (SDPA) attention, one fresh process per
# case. Each case's peak is VmHWM minus the resident size after imports and a warm-up (see measure_training_peak).
CASES = [dict(model="default", method=m, batch_size=8, seq_len=128) for m in ("lora", "full", "qlora")] + \
        [dict(model=BIG, method=m, batch_size=2, seq_len=64) for m in ("lora", "full", "qlora")] + \
        [dict(model=m, method="full", batch_size=b, seq_len=s, optimizer="adamw-8bit")  # bitsandbytes' 8-bit AdamW
         for m, b, s in (("default", 8, 128), (BIG, 2, 64))] + \
        [dict(model="default", method="lora", batch_size=8, seq_len=128, loss_chunk=256)]  # rankdial's chunked loss


@pytest.mark.slow
def test_planned_peaks_agree_with_measured_ones_within_15_percent():
    measured = measure_in_fresh_processes(CASES)
    rows, bad = [], []
    for case, got in zip(CASES, measured):
        assert "error" not in got, got
        plan = estimate_memory(**case, dtype="fp32", gradient_checkpointing=False)
        err = (plan.total_bytes - got["peak"]) / got["peak"]
        built = (plan.weights_bytes + plan.adapters - got["model"]) / got["model"]
        name = case["model"] if isinstance(case["model"], str) else "big"
        rows.append(f"{name} {case['method']} {case.get('optimizer', 'adamw')} chunk {case.get('loss_chunk', 0)}: planned {plan.total_bytes / 2**20:.0f} MiB, measured "
                    f"{got['peak'] / 2**20:.0f} MiB ({100 * err:+.1f}%); model {100 * built:+.1f}%")
        if abs(err) > 0.15 or abs(built) > 0.15:
            bad.append(rows[-1])
    print("\n".join(rows))
    assert not bad, "\n".join(rows)


def test_dimensions_with_a_typo_or_a_negative_head_dim_are_named():
    with pytest.raises(ConfigError, match="unknown 'hiden' \\(did you mean 'hidden'\\?\\)"):
        estimate_memory({"hiden": 64, "layers": 2, "heads": 4, "kv_heads": 4, "ffn": 128, "vocab": 100})
    with pytest.raises(ConfigError, match="head_dim must be a positive integer"):
        estimate_memory({"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 4, "ffn": 128, "vocab": 100,
                         "head_dim": -16})


def test_the_logits_term_follows_the_chunked_loss():
    plain = estimate_memory("llama-7b", batch_size=8, seq_len=512)
    chunked = estimate_memory("llama-7b", batch_size=8, seq_len=512, loss_chunk=1024)
    assert plain.logits == 8 * 512 * 32000 * (2 + 12)  # bf16 logits, fp32 log-softmax and two fp32 gradients
    assert chunked.logits == 1024 * 32000 * (2 + 4) + 3 * 8 * 512 * 4096 * 4
    assert chunked.total_bytes < plain.total_bytes and chunked.activations == plain.activations
    assert estimate_memory("llama-7b", batch_size=1, seq_len=512, loss_chunk=4096).logits == \
        512 * 32000 * 6 + 3 * 512 * 4096 * 4  # a chunk larger than the batch is the batch
    with pytest.raises(ConfigError, match="loss_chunk must be 0.*got -1"):
        estimate_memory("default", loss_chunk=-1)


def test_estimate_command_passes_loss_chunk_and_optimizer(capsys):
    from rankdial.cli import main

    assert main(["estimate", "llama-7b", "--batch-size", "8", "--seq-len", "512", "--loss-chunk", "1024",
                 "--optimizer", "adamw-8bit", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = estimate_memory("llama-7b", batch_size=8, seq_len=512, loss_chunk=1024, optimizer="adamw-8bit")
    assert got["logits"] == want.logits and got["optimizer"] == want.optimizer and got["settings"]["loss_chunk"] == 1024


def test_adamw_8bit_with_fsdp_is_refused_as_train_refuses_it():
    """train refuses optimizer='adamw-8bit' with sharding='fsdp'; the planner planned it."""
    with pytest.raises(ConfigError, match=r"optimizer='adamw-8bit' with sharding='fsdp'"):
        estimate_memory("llama-7b", processes=2, sharding="fsdp", optimizer="adamw-8bit")
    assert estimate_memory("llama-7b", processes=1, sharding="fsdp", optimizer="adamw").total_bytes > 0


def test_the_workspace_holds_lora_s_merged_weight_only_where_training_forms_it():
    """lora.layer._FusedLora forms W0 + s*BA (one d_out x d_in buffer) for float32 weights on many rows; the plan's
    workspace counts the largest such target, and nothing for bf16 weights or few rows (the low-rank form)."""
    from rankdial.lora.layer import merge_first as layer_choice
    from rankdial.memory import merge_first

    assert layer_choice is merge_first  # one rule: the planner's workspace follows the layer's choice
    dims = dict(hidden=256, layers=2, heads=4, kv_heads=4, ffn=768, vocab=512)
    many = estimate_memory(dims, "lora", batch_size=16, seq_len=64, dtype="fp32")
    assert many.workspace == 256 * 768 * 4  # the MLP's 256 x 768 weights are the largest merged ones
    assert estimate_memory(dims, "lora", batch_size=16, seq_len=64, dtype="bf16").workspace == 0
    assert estimate_memory(dims, "lora", batch_size=1, seq_len=8, dtype="fp32").workspace == 0  # 8 rows: unmerged
    attn_only = estimate_memory(dims, "lora", batch_size=16, seq_len=64, dtype="fp32", targets=["q_proj", "v_proj"])
    assert attn_only.workspace == 256 * 256 * 4
    assert estimate_memory(dims, "full", batch_size=16, seq_len=64, dtype="fp32").workspace == 0
    assert estimate_memory(dims, "lora", batch_size=16, seq_len=64, dtype="float32",  # aliases are the same dtype
                           adapter_dtype="float32").workspace == many.workspace
    assert estimate_memory(dims, "lora", batch_size=16, seq_len=64, dtype="fp32",  # dropout/autocast: unmerged
                           merged_weight=False).workspace == 0


@pytest.mark.parametrize("kwargs, words", [
    (dict(targets=None), "targets must be \"all-linear\" or a list"),
    (dict(targets=5), "targets must be \"all-linear\" or a list"),
    (dict(targets=[1]), "targets must be \"all-linear\" or a list"),
    (dict(targets="q_proj,v_proj"), "is one string; give a list of names, e.g. \\['q_proj', 'v_proj'\\]"),
    (dict(model=None), "model must be a preset name"),
    (dict(merged_weight="no"), "merged_weight must be true or false, got 'no'"),
    (dict(method="dora"), "DoRA is LoRA \\(use_dora\\)"),
])
def test_inputs_of_the_wrong_kind_are_named(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        estimate_memory(**kwargs)


def test_adapter_dtype_is_reported_by_its_one_name():
    assert estimate_memory("default", adapter_dtype="float32").settings["adapter_dtype"] == "fp32"
