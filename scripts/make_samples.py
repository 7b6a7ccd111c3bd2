"""Write the sample datasets that ship with the default model (src/rankdial/models/default/samples/).

    python scripts/make_samples.py

The default model knows only King James English; these teach it something visibly new: to answer
"What does NAME do?" with the first sentence of NAME's docstring from Python's standard library
(Python Software Foundation License, which allows redistribution). Deterministic: the same Python
version gives the same files.

    pydoc_qa.jsonl     {"prompt","completion"}     train split
    pydoc_qa_eval.jsonl                             held-out names, for evaluation
    pydoc_chat.jsonl   {"messages": [...]}          the same pairs as chat turns
    psalms.jsonl       {"text"}                     plain text (a few verse-like lines, for the text format)
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
import sys
from pathlib import Path

MODULES = ["builtins", "math", "os.path", "random", "string", "itertools", "functools", "json", "re", "statistics",
           "shutil", "textwrap", "operator", "bisect", "heapq", "copy", "time", "glob", "fnmatch", "base64",
           "zlib", "gzip", "hashlib", "secrets", "uuid", "calendar", "datetime", "decimal", "fractions",
           "collections", "pathlib", "tempfile", "csv", "difflib", "html", "urllib.parse", "unicodedata", "cmath",
           "keyword", "pprint", "struct", "codecs", "locale", "inspect", "ast", "dis", "gc", "sys", "os"]
TYPES = [str, list, dict, set, bytes, int, float, tuple, frozenset]


def first_sentence(doc: str | None) -> str | None:
    if not doc:
        return None
    lines = [l.strip() for l in doc.strip().splitlines()]
    para = []
    for l in lines:
        if not l:
            if para:
                break
            continue
        if re.match(r"^[\w.]+\(.*\)( -> .*)?$", l) and not para:  # a signature line such as "abs(x, /)"
            continue
        para.append(l)
    text = " ".join(para)
    m = re.match(r"(.+?\.)(\s|$)", text)
    text = m.group(1) if m else text
    if not (15 <= len(text) <= 140) or not text[0].isupper() or "\\" in text:
        return None
    return text


def pairs() -> list[tuple[str, str]]:
    out, seen = {}, set()
    for modname in MODULES:
        mod = importlib.import_module(modname)
        for name in sorted(dir(mod)):
            if name.startswith("_"):
                continue
            obj = getattr(mod, name)
            if not (inspect.isbuiltin(obj) or inspect.isfunction(obj)) or id(obj) in seen:
                continue  # (a function re-exported by a later module keeps its first name)
            seen.add(id(obj))
            s = first_sentence(inspect.getdoc(obj))
            full = name if modname == "builtins" else f"{modname}.{name}"
            if s:
                out[full] = s
    for t in TYPES:
        for name in sorted(vars(t)):
            if name.startswith("_"):
                continue
            s = first_sentence(inspect.getdoc(getattr(t, name)))
            if s:
                out[f"{t.__name__}.{name}"] = s
    return sorted(out.items())


def main() -> int:
    dest = Path(__file__).resolve().parents[1] / "src/rankdial/models/default/samples"
    dest.mkdir(parents=True, exist_ok=True)
    items = pairs()
    rng = random.Random(0)
    rng.shuffle(items)
    items = items[:480]
    evals, train = items[:40], items[40:]

    def write(name, rows):
        with open(dest / name, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    qa = lambda n, s: {"prompt": f"What does {n} do?\n", "completion": s}  # noqa: E731
    write("pydoc_qa.jsonl", [qa(n, s) for n, s in train])
    write("pydoc_qa_eval.jsonl", [qa(n, s) for n, s in evals])
    write("pydoc_chat.jsonl", [{"messages": [{"role": "user", "content": f"What does {n} do?"},
                                             {"role": "assistant", "content": s}]} for n, s in train])
    psalms = ["Praise ye the compiler; for it is good to build with care.",
              "The tests are my shepherd; I shall not ship a bug.",
              "Blessed is the engineer that walketh not in the way of the flaky, nor standeth in the path of untested code.",
              "Commit early, and commit often; for thou knowest not the hour when the session endeth.",
              "A merged adapter costeth nothing at inference, and the wise shall fold B into A.",
              "Low is the rank, and narrow the way, that leadeth unto a good fine tune."]
    write("psalms.jsonl", [{"text": t} for t in psalms])
    print(f"wrote {len(train)} train / {len(evals)} eval pairs to {dest} (Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
