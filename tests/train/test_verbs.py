"""The verbs around training: merge (a folder transformers loads), generate (side by side), help with examples."""

import json

import pytest
import torch

from conftest import qa_rows, write_jsonl
from rankdial.cli import build_parser, main
from rankdial.train import train


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verbs")
    data = write_jsonl(tmp / "d.jsonl", qa_rows(16))
    runs = {}
    for method in ("lora", "qlora"):
        runs[method] = train(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp / method), steps=4,
                             batch_size=4, lr=1e-2, max_length=48, method=method, progress=False,
                             log=lambda *a: None).output_dir
    return tmp, runs


@pytest.mark.slow  # trains two runs (module fixture)
def test_merge_writes_a_plain_model_that_answers_like_base_plus_adapter(trained, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    from rankdial import load_adapter

    tmp, runs = trained
    assert main(["merge", str(runs["lora"]), "--out", str(tmp / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp / "merged").eval()
    assert not any("lora" in k for k in merged.state_dict())
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    load_adapter(ref, runs["lora"])
    ids = torch.tensor([[1, 50, 900, 7]])
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max() < 1e-4
    assert (tmp / "merged" / "tokenizer.json").is_file()


@pytest.mark.slow  # trains two runs (module fixture)
def test_generate_compares_base_and_several_adapters(trained, tiny_model_dir, capsys):
    tmp, runs = trained
    assert main(["generate", "What is alpha 3?\n", "--adapter", str(runs["lora"]), "--adapter", str(runs["qlora"]),
                 "--max-new-tokens", "5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and len(rows[0]["outputs"]) == 3
    assert list(rows[0]["outputs"])[1:] == [str(runs["lora"]), str(runs["qlora"])]
    assert main(["generate", "hello", "--model", str(tiny_model_dir), "--adapter", str(runs["lora"]), "--no-base",
                 "--max-new-tokens", "3", "--temperature", "0.9", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)[0]["outputs"]) == [str(runs["lora"])]


def test_generate_names_a_missing_adapter(tmp_path, capsys):
    assert main(["generate", "x", "--adapter", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow  # trains two runs (module fixture)
def test_inspect_a_training_output(trained, capsys):
    _, runs = trained
    assert main(["inspect", str(runs["lora"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["r"] == 16 and len(info["modules"]) == 14 and all(m["delta_norm"] > 0 for m in info["modules"])


def test_every_verb_has_help_with_an_example():
    verbs = build_parser().verb_parsers
    assert {"demo", "train", "merge", "generate", "inspect", "convert-bin"} <= set(verbs)
    for name, sub in verbs.items():
        assert "example" in sub.format_help(), name


@pytest.mark.slow  # trains two runs (module fixture)
def test_qlora_adapter_merges_into_the_base_it_was_trained_on(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from rankdial import load_adapter
    from rankdial.models import load_model_nf4
    from rankdial.quant import set_fused_inference

    tmp, runs = trained
    assert main(["merge", str(runs["qlora"]), "--out", str(tmp / "mq")]) == 0
    assert main(["merge", str(runs["qlora"]), "--out", str(tmp / "mq-dense"), "--dense-base"]) == 0
    ref, _ = load_model_nf4(tiny_model_dir)
    set_fused_inference(ref, False)
    load_adapter(ref, runs["qlora"])
    ids = torch.tensor([[1, 50, 900, 7]])
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp / "mq")(input_ids=ids).logits
        dense = AutoModelForCausalLM.from_pretrained(tmp / "mq-dense")(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4
    assert (dense - want).abs().max() > 1e-4  # the NF4 rounding error is real


def test_an_unfinished_run_is_not_used_as_an_adapter(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "rankdial_train.json").write_text("{}")
    assert main(["generate", "x", "--adapter", str(run), "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert "has not finished" in err and "--resume" in err
    assert main(["merge", str(run), "--out", str(tmp_path / "m"), "--model", str(tiny_model_dir)]) == 2
    assert not (tmp_path / "m").exists()
