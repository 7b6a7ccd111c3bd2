"""`rankdial generate` (rankdial.compare): bad arguments are one-line errors, inputs go to the model's device."""

import pytest
import torch
from types import SimpleNamespace

from rankdial.cli import main
from rankdial.compare import check_sampling, compare, encode, max_logit_diff, sample
from rankdial.errors import ConfigError, ModelError, TrainingInterrupted


def one_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, words", [
    (["generate", ""], ["prompt 1", "''"]),
    (["generate", "x", "--max-new-tokens", "-1"], ["--max-new-tokens", "-1", ">= 1"]),
    (["generate", "x", "--max-new-tokens", "0"], ["--max-new-tokens", "0", ">= 1"]),
    (["generate", "x", "--temperature", "-1"], ["--temperature", "-1", ">= 0"]),
    (["generate", "x", "--temperature", "nan"], ["--temperature", "nan", ">= 0"]),
    (["generate", "x", "--top-p", "2"], ["--top-p", "2", "(0, 1]"]),
    (["generate", "x", "--top-p", "0"], ["--top-p", "0", "(0, 1]"]),
])
def test_bad_generate_arguments_are_one_line_errors_before_the_model_loads(argv, words, capsys, monkeypatch):
    import rankdial.compare as compare_module

    monkeypatch.setattr(compare_module, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(argv) == 2
    err = one_line(capsys)
    assert err.startswith("rankdial generate: error:")
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=-1), dict(max_new_tokens=1.5), dict(temperature=-0.1),
                                    dict(temperature=float("inf")), dict(top_p=2.0), dict(top_p=0.0)])
def test_the_library_refuses_the_same_values(kwargs):
    with pytest.raises(ConfigError) as err:
        check_sampling(["x"], **kwargs)
    assert isinstance(err.value, ValueError) and repr(next(iter(kwargs.values()))) in str(err.value)


class FakeLM(torch.nn.Module):
    """A model on any device (meta included) that records where its inputs were and answers on the CPU."""

    def __init__(self, device):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, device=device))
        self.seen = []

    def forward(self, input_ids):
        self.seen.append(input_ids.device)
        return SimpleNamespace(logits=torch.zeros(1, input_ids.shape[1], 4))


@pytest.fixture(scope="module")
def tok():
    from rankdial.models import default_model_path, load_tokenizer

    return load_tokenizer(default_model_path())


def test_inputs_are_built_on_the_models_device(tok):
    a, b = FakeLM("meta"), FakeLM("meta")
    assert max_logit_diff(a, b, tok, "And God said") == 0.0
    assert a.seen == [torch.device("meta")] and b.seen == [torch.device("meta")]  # sample(): the test below
    assert encode(tok, "x", "meta").device == torch.device("meta")


def test_models_on_two_devices_are_refused(tok):
    with pytest.raises(ModelError, match="different devices"):
        max_logit_diff(FakeLM("meta"), FakeLM("cpu"), tok, "x")


def test_a_prompt_with_no_tokens_and_bad_settings_fail_before_sampling(tok):
    net = FakeLM("cpu")
    with pytest.raises(ConfigError, match="prompt 2"):
        compare(net, tok, [], ["ok", ""], max_new_tokens=3)
    with pytest.raises(ConfigError, match="--top-p"):
        compare(net, tok, [], ["ok"], top_p=1.5)
    assert net.seen == []


def test_generate_takes_its_device_from_the_flag(capsys, monkeypatch):
    import rankdial.compare as compare_module

    seen = []

    def record(path, device="cpu"):
        seen.append(device)
        raise ModelError("stop here")
    monkeypatch.setattr(compare_module, "load_model", record)
    assert main(["generate", "x", "--device", "cpu"]) == 2
    assert seen == [torch.device("cpu")]
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert main(["generate", "x", "--device", "cuda"]) == 2
        assert "no CUDA GPU" in one_line(capsys) and len(seen) == 1


def test_ctrl_c_in_any_verb_is_one_line_and_exit_130(capsys, monkeypatch):
    import rankdial.compare as compare_module

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(compare_module, "load_model", ctrl_c)
    assert main(["generate", "x"]) == 130
    assert capsys.readouterr().err == "rankdial generate: interrupted\n"


def test_an_interrupted_training_run_says_where_in_one_line(capsys, monkeypatch):
    import rankdial.train as train_module

    def stopped(*a, **k):
        raise TrainingInterrupted("interrupted at step 12 of 40;\nlast checkpoint: out/run/checkpoint-10;\n"
                                  "continue with --resume")
    monkeypatch.setattr(train_module, "train", stopped)
    assert main(["train", "--data", "d.jsonl"]) == 130
    err = one_line(capsys)
    assert "step 12" in err and "checkpoint-10" in err and "--resume" in err


@pytest.mark.slow
def test_generate_and_the_server_give_the_same_text_for_a_seed(tmp_path):
    """Issue 19: one sampler, one meaning of a seed: `rankdial generate` (compare.sample) and the serving engine
    give the same text for the same prompt, seed and settings, on the base and on an adapter."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "serve"))
    from engine_helpers import PROMPTS, make_adapter
    from rankdial.compare import load_variants
    from rankdial.serve import Engine, SamplingParams

    make_adapter(tmp_path / "ad", seed=3, r=4)
    net, tok, variants = load_variants(None, [str(tmp_path / "ad")], "cpu")
    engine = Engine.from_pretrained("default", str(tmp_path), device="cpu")
    try:
        for seed, (temperature, top_p) in enumerate([(1.0, 1.0), (0.8, 0.9), (1.3, 0.95), (0.0, 1.0)]):
            prompt = PROMPTS[seed]
            served = {a: engine.generate(prompt, a, SamplingParams(max_tokens=24, temperature=temperature,
                                                                   top_p=top_p, seed=seed)).text for a in (None, "ad")}
            row = compare(net, tok, variants, [prompt], max_new_tokens=24, temperature=temperature, top_p=top_p,
                          seed=seed)[0]["outputs"]
            assert list(row.values()) == [served[None], served["ad"]]
    finally:
        engine.shutdown(drain=False)
