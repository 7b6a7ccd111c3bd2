"""Data: the three JSONL shapes, their loss masks, truncation, packing and every bad input."""


import pytest

from conftest import write_jsonl
from rankdial.train import DataError, load_dataset
from rankdial.train.data import IGNORE, collate, pack, split_eval
from rankdial.models import load_tokenizer, default_model_path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_path())


def _targets(tok, example):
    return tok.decode([t for t in example.labels if t != IGNORE])


def test_prompt_completion_loss_is_on_completion_and_eos_only(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "What does len do?\n", "completion": "Return the length."}])
    ex = load_dataset(f, tok, 64).examples[0]
    assert tok.decode(ex.input_ids) == "What does len do?\nReturn the length.<|endoftext|>"
    assert _targets(tok, ex) == "Return the length.<|endoftext|>"


def test_chat_uses_the_template_and_learns_assistant_turns_only(tok, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Farewell."}]
    ex = load_dataset(write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]), tok, 128).examples[0]
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    assert _targets(tok, ex) == "Hello.<|endoftext|>\nFarewell.<|endoftext|>\n"


def test_text_learns_every_token(tok, tmp_path):
    ex = load_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "In the beginning"}]), tok, 64).examples[0]
    assert ex.labels == ex.input_ids


def test_truncation_is_counted_and_too_short_max_length_is_an_error(tok, tmp_path):
    rows = [{"prompt": "word " * 30, "completion": "end"}, {"prompt": "short\n", "completion": "fine answer"}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_dataset(f, tok, 12)
    assert data.truncated == 1 and data.dropped_no_target == 1 and len(data.examples) == 1
    assert "1 truncated" in data.describe() and "1 dropped" in data.describe()
    with pytest.raises(DataError, match=r"max_length=2 is too small.*--max-length"):
        load_dataset(f, tok, 2)


def test_malformed_line_names_file_and_line_and_can_be_skipped(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "good"}\n{"text": "broken"\n{"prompt": "p"}\n\n{"text": "also good"}\n')
    with pytest.raises(DataError, match=rf"{f}:2: not valid JSON.*--skip-bad-lines"):
        load_dataset(f, tok, 32)
    data = load_dataset(f, tok, 32, skip_bad_lines=True)
    assert len(data.examples) == 2
    assert [m.split(": ", 1)[0] for m in data.skipped_lines] == [f"{f}:2", f"{f}:3"]
    assert "completion" in data.skipped_lines[1]


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    ('{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n',
     r"d.jsonl:1: messages\[0\] has role 'wizard'; allowed roles: system, user, assistant"),
    ("", "has no examples"),
    ("\n\n", "has no examples"),
    ('{"foo": 1}\n', 'no "prompt"/"completion", "messages" or "text" key'),
    ('[1, 2]\n', "expected a JSON object"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', 'no message has role "assistant"'),
    ('{"prompt": "p", "completion": ""}\n', '"completion" is empty'),
])
def test_bad_data_files(tok, tmp_path, content, match):
    f = tmp_path / "d.jsonl"
    if content is not None:
        f.write_text(content)
    with pytest.raises(DataError, match=match):
        load_dataset(f, tok, 32)


def test_packing_keeps_every_target_token_and_eval_split_is_seeded(tok, tmp_path):
    rows = [{"prompt": f"q{i}\n", "completion": f"answer number {i}"} for i in range(20)]
    data = load_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tok, 32)
    packed = pack(data, 16)
    assert all(len(e.input_ids) == 16 for e in packed.examples[:-1])
    flat = lambda d, key: [t for e in d.examples for t in getattr(e, key)]  # noqa: E731
    assert flat(packed, "input_ids") == flat(data, "input_ids")
    assert flat(packed, "labels") == flat(data, "labels")  # every target token, at its own position
    assert sum(t != IGNORE for t in flat(packed, "labels")) == sum(t != IGNORE for t in flat(data, "labels")) > 0
    tr1, ev1 = split_eval(data, 0.25, seed=3)
    tr2, ev2 = split_eval(data, 0.25, seed=3)
    assert len(ev1.examples) == 5 and [e.input_ids for e in ev1.examples] == [e.input_ids for e in ev2.examples]
    batch = collate(data.examples[:3], pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_data_naming_a_directory_says_so(tok, tmp_path):
    with pytest.raises(DataError, match="is a directory, not a file"):
        load_dataset(tmp_path, tok, 32)


def test_tool_role_is_allowed_when_the_chat_template_has_one(tok):
    from rankdial.train.data import ROLES, chat_roles

    assert chat_roles(tok) == ROLES  # the default model's template knows no tool role

    class WithTool:
        chat_template = "{% if message['role'] == 'tool' %}...{% endif %}"

    assert chat_roles(WithTool()) == ROLES + ("tool",)


def test_metrics_are_strict_json(tmp_path):
    from rankdial import TrainingError
    from rankdial.train.artefacts import append_metrics

    append_metrics(tmp_path / "m.jsonl", {"step": 1, "loss": 2.5})
    with pytest.raises(TrainingError, match="not a finite number"):
        append_metrics(tmp_path / "m.jsonl", {"step": 2, "eval_loss": float("inf")})
    assert (tmp_path / "m.jsonl").read_text() == '{"step": 1, "loss": 2.5}\n'


def test_packing_drops_rows_without_a_target_token():
    from rankdial.train.data import IGNORE, Dataset, Example, pack

    examples = [Example([1, 2, 3, 4, 5, 6], [IGNORE, IGNORE, IGNORE, IGNORE, 5, 6]),
                Example([7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [IGNORE] * 9 + [16])]
    rows = pack(Dataset(examples, "mem", "prompt/completion", 0, 0, []), 8).examples
    assert rows and all(row.n_targets > 0 for row in rows)
