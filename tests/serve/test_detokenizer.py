"""A request's text (serve/detokenizer.py): the pieces TextStream hands out add up to the whole decode cut before
its first stop sequence, whatever the stops and wherever they fall, and nothing after a stop is handed out."""

from __future__ import annotations

import random

import pytest

from rankdial.models import default_model_path, load_tokenizer
from rankdial.serve.detokenizer import TextStream


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_path())


def reference(tok, ids: list[int], stops: tuple[str, ...]) -> tuple[str, bool]:
    """The obvious way: decode everything, cut at the earliest stop."""
    text = tok.decode(ids, skip_special_tokens=True)
    cuts = [text.find(s) for s in stops if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


@pytest.mark.parametrize("seed", range(6))
def test_pieces_add_up_to_the_decode_cut_at_the_first_stop(tok, seed):
    rng = random.Random(seed)
    ids = tok.encode("And God said, Let there be light: and there was light. And God saw the light, that it "
                     "was good: and God divided the light from the darkness.", add_special_tokens=False)
    ids = ids[:rng.randint(5, len(ids))] + [rng.randrange(3, 4000) for _ in range(rng.randint(0, 6))]
    whole = tok.decode(ids, skip_special_tokens=True)
    stops = tuple(sorted({whole[i:i + rng.randint(1, 4)] for i in [rng.randrange(len(whole)) for _ in range(rng.randint(0, 3))]}
                  - {""})) + (("never-in-the-text",) if seed % 2 else ())
    stream, pieces, stopped = TextStream(stops), [], False
    for k, token in enumerate(ids):
        out, stopped = stream.push(tok, token, final=k == len(ids) - 1)
        pieces.append(out)
        if stopped:
            break
    want, want_stop = reference(tok, ids, stops)
    assert ("".join(pieces), stopped) == (want, want_stop), stops


def test_the_earliest_stop_wins_whatever_their_order(tok):
    """Two stops that both appear: the completion ends before the earlier one in the text, not the first listed."""
    ids = tok.encode("In the beginning God created the heaven", add_special_tokens=False)
    whole = tok.decode(ids)
    for stops in [("heaven", "God"), ("God", "heaven"), ("created", "beginning", "heaven")]:
        stream, text = TextStream(stops), ""
        for k, token in enumerate(ids):
            out, stopped = stream.push(tok, token, final=k == len(ids) - 1)
            text += out
            if stopped:
                break
        assert stopped and text == whole[:min(whole.index(s) for s in stops)], stops
