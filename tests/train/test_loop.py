"""The training loop: it learns, it repeats bit for bit, its output folder is a PEFT adapter, it stops on NaN."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import qa_rows, write_jsonl
from rankdial.train import TrainingError, train
from rankdial.train.checkpoint import list_checkpoints


def _run(tiny_model_dir, tmp_path, name="run", **kw):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, qa_rows(24))
    args = dict(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / name), steps=8, batch_size=4,
                lr=5e-3, max_length=48, progress=False, log=lambda *a: None)
    args.update(kw)
    return train(**args)


def test_lora_learns_and_writes_a_complete_output_folder(tiny_model_dir, tmp_path):
    r = _run(tiny_model_dir, tmp_path, eval_fraction=0.2, eval_every=4, steps=12)
    assert r.losses[-1] < r.losses[0]
    assert r.eval_losses[-1][1] < r.eval_losses[0][1]
    out = r.output_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "rankdial_train.json", "metrics.jsonl",
                 "loss.png", "summary.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == list(range(1, 13))
    assert [l["step"] for l in lines if "eval_loss" in l] == [0, 4, 8, 12]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and 0 < summary["trainable_percent"] < 100


def test_same_seed_gives_bit_identical_adapter(tiny_model_dir, tmp_path):
    a = _run(tiny_model_dir, tmp_path, "a", lora_dropout=0.1)
    b = _run(tiny_model_dir, tmp_path, "b", lora_dropout=0.1)
    c = _run(tiny_model_dir, tmp_path, "c", lora_dropout=0.1, seed=1)
    ta, tb, tc = (load_file(r.output_dir / "adapter_model.safetensors") for r in (a, b, c))
    assert a.losses == b.losses
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)


def test_grad_accumulation_matches_a_bigger_batch(tiny_model_dir, tmp_path):
    big = _run(tiny_model_dir, tmp_path, "big", batch_size=8, grad_accum=1, steps=4)
    acc = _run(tiny_model_dir, tmp_path, "acc", batch_size=2, grad_accum=4, steps=4)
    assert big.losses == pytest.approx(acc.losses, abs=1e-5)


@pytest.mark.slow
def test_adapter_loads_in_peft_and_matches(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rankdial import load_adapter

    r = _run(tiny_model_dir, tmp_path, steps=4)
    ids = torch.tensor([[5, 17, 300, 41, 9]])
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    load_adapter(ours, r.output_dir)
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(r.output_dir)).eval()
    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_qlora_and_full_methods_train(tiny_model_dir, tmp_path, method):
    r = _run(tiny_model_dir, tmp_path, method=method, steps=6, max_grad_norm=0.0)
    assert r.losses[-1] < r.losses[0]
    if method == "full":
        assert r.trainable == r.total
        assert (r.output_dir / "model.safetensors").is_file() and (r.output_dir / "tokenizer.json").is_file()
    else:
        assert r.trainable < r.total / 4
        assert (r.output_dir / "adapter_model.safetensors").is_file()


def test_gradient_checkpointing_gives_the_same_losses(tiny_model_dir, tmp_path):
    plain = _run(tiny_model_dir, tmp_path, "plain", steps=2)
    ckpt = _run(tiny_model_dir, tmp_path, "gc", steps=2, gradient_checkpointing=True)
    assert plain.losses == pytest.approx(ckpt.losses, abs=1e-5)


def test_packing_trains_on_full_rows_of_the_same_tokens_and_labels(tiny_model_dir, tmp_path):
    from rankdial.models import load_tokenizer
    from rankdial.train import make_config
    from rankdial.train.pieces import load_data

    write_jsonl(tmp_path / "train.jsonl", qa_rows(24))
    cfg = make_config(data=str(tmp_path / "train.jsonl"), max_length=48)
    tok = load_tokenizer(tiny_model_dir)
    plain, _, _ = load_data(cfg, tok)
    packed, _, report = load_data(make_config(cfg, packing=True), tok)
    assert all(len(e.input_ids) == 48 for e in packed.examples[:-1]) and len(packed.examples) < len(plain.examples)
    flat = lambda d, key: [t for e in d.examples for t in getattr(e, key)]  # noqa: E731
    assert flat(packed, "input_ids") == flat(plain, "input_ids") and flat(packed, "labels") == flat(plain, "labels")
    r = _run(tiny_model_dir, tmp_path, "packed", steps=2, packing=True)
    assert "packed" in r.data_report[0] and all(0 < x < 20 for x in r.losses)


def test_finished_output_folder_is_not_overwritten(tiny_model_dir, tmp_path):
    from rankdial import OutputError
    from rankdial.atomic import read_marker

    _run(tiny_model_dir, tmp_path, steps=1)
    assert read_marker(tmp_path / "run") == "train-run"
    with pytest.raises(TrainingError, match="already holds a finished run.*--overwrite"):
        _run(tiny_model_dir, tmp_path, steps=1)
    _run(tiny_model_dir, tmp_path, steps=1, overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for kw in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(OutputError, match="rankdial did not write it"):
            _run(tiny_model_dir, tmp_path, "other", steps=1, **kw)
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    import rankdial.train.loop as loop

    real = loop.token_loss_sum
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] > 5 else loss  # micro-batches 6+ (step 6) go NaN

    monkeypatch.setattr(loop, "token_loss_sum", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan at step 6.*step-000004.*--resume"):
        _run(tiny_model_dir, tmp_path, save_every=2, steps=10)
    out = tmp_path / "run"
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000004"]
    assert not (out / "summary.json").exists() and not (out / "adapter_config.json").exists()


def test_quantize_on_load_equals_load_then_quantize(tiny_model_dir):
    from rankdial.quant import quantize_model, set_fused_inference
    from rankdial.quant.linear import NF4Linear
    from rankdial.models import load_model, load_model_nf4

    a, _ = load_model(tiny_model_dir)
    quantize_model(a)
    b, _ = load_model_nf4(tiny_model_dir)
    assert sum(isinstance(m, NF4Linear) for m in b.modules()) == 14
    assert b.lm_head.weight is b.model.embed_tokens.weight  # tied, full precision
    set_fused_inference(a, False)
    set_fused_inference(b, False)
    ids = torch.tensor([[1, 2, 3, 400, 5]])
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_bf16_autocast_trains_close_to_fp32(tiny_model_dir, tmp_path, method):
    fp32 = _run(tiny_model_dir, tmp_path, "fp32", method=method, steps=3)
    bf16 = _run(tiny_model_dir, tmp_path, "bf16", method=method, steps=3, bf16=True)
    assert all(torch.isfinite(torch.tensor(bf16.losses)))
    assert bf16.losses[0] == pytest.approx(fp32.losses[0], abs=0.05)


def test_non_finite_gradients_stop_the_run_before_the_update(tiny_model_dir, tmp_path):
    """A finite loss with an infinite gradient must not reach the optimizer (it would poison every weight)."""
    from rankdial.errors import TrainingError
    from rankdial.train import make_config
    from rankdial.train.loop import fit, output_folder, setup
    from rankdial.train.pieces import prepare_model

    def poisoned(model, cfg, base_path):
        lora = prepare_model(model, cfg, base_path)
        first = next(p for n, p in model.named_parameters() if ".lora_B." in n)
        first.register_hook(lambda g: g * float("inf"))
        return lora

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    cfg = make_config(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "run"), steps=3,
                      batch_size=2, max_length=64, progress=False)
    run = setup(cfg, prepare=poisoned)
    before = {n: p.detach().clone() for n, p in run.named.items()}
    with pytest.raises(TrainingError, match="gradient norm became (inf|nan) at step 1"):
        with output_folder(run):
            fit(run)
    assert all(torch.equal(before[n], p) for n, p in run.named.items())


def test_resume_takes_the_configs_lr(tiny_model_dir, tmp_path):
    import json

    from rankdial.train import train

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    args = dict(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "run"), steps=4, batch_size=2,
                max_length=64, progress=False, save_every=2, warmup_ratio=0.0, min_lr_ratio=1.0)  # constant lr
    train(lr=1e-2, **args)
    for name in ("summary.json", "adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "run" / name).unlink()  # as if it had stopped after step 2's checkpoint
    said = []
    train(lr=1e-4, resume=True, log=said.append, **args)
    assert any("lr 0.01 -> 0.0001" in line for line in said), said
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
           if "lr" in r}
    assert lrs[2] == pytest.approx(1e-2) and lrs[3] == pytest.approx(1e-4) and lrs[4] == pytest.approx(1e-4)
