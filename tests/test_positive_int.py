"""One "positive integer" test (config.is_positive_int) for every rank, count and token budget the library checks."""

import pytest

from rankdial import ConfigError
from rankdial.config import is_positive_int


@pytest.mark.parametrize("value, ok", [(1, True), (64, True), (0, False), (-3, False), (True, False), (1.0, False),
                                       ("4", False), (None, False)])
def test_the_predicate(value, ok):
    assert is_positive_int(value) is ok


@pytest.mark.parametrize("bad", [0, True, 2.0])
def test_every_site_that_uses_it_refuses_the_same_values(bad):
    from rankdial.memory import lora_params
    from rankdial.rank.sweep import check_ranks

    with pytest.raises(ConfigError, match="rank r must be an integer"):
        lora_params(64, 64, bad)
    with pytest.raises(ConfigError, match="positive integers"):
        check_ranks([1, bad])
    with pytest.raises(ConfigError):
        from rankdial.config import LoraConfig
        LoraConfig(r=bad)


def test_no_site_writes_the_check_by_hand():
    """The positive-integer test is config.is_positive_int everywhere: no module spells out its own
    bool/int/< 1 combination (they drifted: some let True through, some 1.0)."""
    import re
    from pathlib import Path

    import rankdial

    by_hand = re.compile(r"isinstance\((\w+(?:\.\w+)?), bool\)[^\n]*isinstance\(\1, int\)[^\n]*\1 < 1"
                         r"|isinstance\((\w+(?:\.\w+)?), int\)[^\n]*isinstance\(\2, bool\)[^\n]*\2 < 1")
    root = Path(rankdial.__file__).parent
    found = [f"{p.relative_to(root)}:{n}" for p in sorted(root.rglob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1) if by_hand.search(line)]
    assert found == [], f"use rankdial.config.is_positive_int at {found}"
