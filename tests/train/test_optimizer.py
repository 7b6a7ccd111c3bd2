"""optimizer = "adamw-8bit": blockwise 8-bit AdamW states (~2 bytes per parameter), checkpoints and exact resume,
and a one-line error where no 8-bit backend runs."""

import io

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_model_dir, qa_rows, write_jsonl
from rankdial import ConfigError, LoraConfig
from rankdial.lora import inject
from rankdial.train import TrainingInterrupted, train
from rankdial.train import pieces
from rankdial.train.config import TrainConfig, make_config


def _lora_model(seed=0):
    """A one-layer Llama whose adapter tensors hold >= 4096 values each (smaller ones keep fp32 states in bnb)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg)
    inject(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    return model


def _cfg(**kw):
    return make_config({"data": "x.jsonl", "lr": 1e-2, **kw})


def _step(model, opt, seed):
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _named(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_8bit_states_hold_about_2_bytes_per_parameter_against_8_for_fp32():
    per_param = {}
    for name in ("adamw", "adamw-8bit"):
        model = _lora_model()
        named = _named(model)
        opt, _ = pieces.make_optimizer(named, _cfg(optimizer=name), 10)
        _step(model, opt, 0)
        per_param[name] = pieces.optimizer_state_bytes(opt) / sum(p.numel() for p in named.values())
    assert per_param["adamw"] == 8.0
    # one byte per moment, an fp32 absmax per 256 values (2.03) and two shared 1 KiB maps (0.03 on 70k values)
    assert 2.0 <= per_param["adamw-8bit"] <= 2.1
    assert type(opt).__module__.startswith(("bitsandbytes", "torchao"))


def test_8bit_state_round_trips_through_a_checkpoint_file_exactly():
    """The checkpoint's torch.save / torch.load(weights_only=True) of the state: resumed steps equal straight ones."""
    a, b = _lora_model(), _lora_model()
    opt_a, _ = pieces.make_optimizer(_named(a), _cfg(optimizer="adamw-8bit"), 10)
    opt_b, _ = pieces.make_optimizer(_named(b), _cfg(optimizer="adamw-8bit"), 10)
    for s in range(3):
        _step(a, opt_a, s)
        _step(b, opt_b, s)
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)
    buf.seek(0)
    opt_b, _ = pieces.make_optimizer(_named(b), _cfg(optimizer="adamw-8bit"), 10)  # a fresh one, as on resume
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    for s in range(3, 6):
        _step(a, opt_a, s)
        _step(b, opt_b, s)
    assert all(torch.equal(p, q) for p, q in zip(_named(a).values(), _named(b).values()))
    assert not all(torch.equal(p, q) for p, q in zip(_named(a).values(), _named(_lora_model()).values()))


def test_no_8bit_backend_is_a_one_line_error_naming_what_to_install(monkeypatch):
    def missing():
        raise ImportError("No module named 'nothing'")

    monkeypatch.setattr(pieces, "ADAMW_8BIT_BACKENDS", (("bitsandbytes", missing), ("torchao", missing)))
    with pytest.raises(ConfigError) as err:
        pieces.make_optimizer(_named(_lora_model()), _cfg(optimizer="adamw-8bit"), 10)
    msg = str(err.value)
    assert "\n" not in msg and "adamw-8bit" in msg and "pip install bitsandbytes" in msg and "torchao" in msg


def test_a_backend_that_fails_on_the_device_falls_through_to_the_next(monkeypatch):
    class Broken(torch.optim.AdamW):
        def step(self, closure=None):
            raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(pieces, "ADAMW_8BIT_BACKENDS", (("broken", lambda: Broken),
                                                       ("bitsandbytes", pieces._bitsandbytes_adamw8bit)))
    opt, _ = pieces.make_optimizer(_named(_lora_model()), _cfg(optimizer="adamw-8bit"), 10)
    assert type(opt).__module__.startswith("bitsandbytes")


def test_unknown_optimizer_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"optimizer='adam8'.*adamw, adamw-8bit"):
        TrainConfig(data="x.jsonl", optimizer="adam8")


@pytest.mark.slow
def test_torchao_backend_when_installed(monkeypatch):
    pytest.importorskip("torchao.optim")
    monkeypatch.setattr(pieces, "ADAMW_8BIT_BACKENDS", (("torchao", pieces._torchao_adamw8bit),))
    model = _lora_model()
    named = _named(model)
    opt, _ = pieces.make_optimizer(named, _cfg(optimizer="adamw-8bit"), 10)
    _step(model, opt, 0)
    assert type(opt).__module__.startswith("torchao")
    assert all(t.codes.dtype == torch.uint8 for s in opt.state.values() for k, t in s.items() if k != "step")
    # torchao keeps a 256-entry fp32 map per tensor: +0.44 bytes per value on these 4096-8192-value tensors
    assert 2.0 <= pieces.optimizer_state_bytes(opt) / sum(p.numel() for p in named.values()) <= 2.5


@pytest.mark.slow
def test_interrupted_8bit_run_resumes_bit_identical(tmp_path, monkeypatch):
    import rankdial.train.loop as loop

    model_dir = make_model_dir(tmp_path / "m", hidden=256, layers=1)  # adapters >= 4096 values: 8-bit states
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(24))
    common = dict(model=str(model_dir), data=str(data), steps=6, batch_size=4, lr=5e-3, max_length=32,
                  save_every=2, optimizer="adamw-8bit", progress=False, log=lambda *a: None)
    ref = train(output_dir=str(tmp_path / "ref"), **common)
    real, calls = loop.token_loss_sum, {"n": 0}

    def crash_at_step_5(*a):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(loop, "token_loss_sum", crash_at_step_5)
    with pytest.raises(TrainingInterrupted, match="step-000004"):
        train(output_dir=str(tmp_path / "run"), **common)
    monkeypatch.setattr(loop, "token_loss_sum", real)
    out = train(output_dir=str(tmp_path / "run"), resume=True, **common)
    assert out.resumed_from == 4
    a, b = load_file(ref.output_dir / "adapter_model.safetensors"), load_file(out.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert out.losses == ref.losses


def test_resuming_with_another_optimizer_is_refused_in_one_line(tiny_model_dir, tmp_path, monkeypatch):
    import rankdial.train.loop as loop
    from conftest import fail_on_call
    from rankdial.train import TrainingError

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(16))
    common = dict(model=str(tiny_model_dir), data=str(data), steps=4, batch_size=4, max_length=32, save_every=2,
                  output_dir=str(tmp_path / "run"), progress=False, log=lambda *a: None)
    fail_on_call(monkeypatch, loop, "token_loss_sum", 3, KeyboardInterrupt())
    with pytest.raises(TrainingInterrupted):
        train(**common)
    monkeypatch.undo()
    with pytest.raises(TrainingError, match=r"optimizer='adamw'; this run has 'adamw-8bit'") as err:
        train(resume=True, optimizer="adamw-8bit", **common)
    assert "\n" not in str(err.value)
