"""rankdial.errors' message helpers: the one home of the one-line, shorten and UTF-8 checks (serve/ has no copies)."""

from pathlib import Path

from rankdial.errors import NOT_UTF8, not_utf8, one_line, shorten

SERVE = Path(__file__).resolve().parents[1] / "src" / "rankdial" / "serve"


def test_one_line_joins_stripped_lines():
    assert one_line(ValueError("a\n  b \n\n c")) == "a b c" and one_line(None) == "" and one_line("x") == "x"


def test_shorten_quotes_and_cuts():
    assert shorten("abc") == "'abc'"
    long = shorten("x" * 500)
    assert long.startswith("'xxx") and long.endswith("...") and len(long) <= 63


def test_not_utf8_finds_a_lone_surrogate():
    assert not_utf8("a \ud800 b") and not not_utf8("été ✓") and "lone surrogate" in NOT_UTF8


def test_serve_writes_no_copy_of_the_helpers():
    found = [f"{p.name}: {needle}" for p in SERVE.glob("*.py") for needle in
             ("splitlines() if line.strip()", "except UnicodeEncodeError", "def _one_line", "def _shown", "def _name(")
             if needle in p.read_text()]
    assert not found, found
