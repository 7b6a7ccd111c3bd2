"""DESIGN.md's import directions, checked on the source: quant/ knows nothing of lora/, the neutral modules
import nothing of the package's layers above them, nothing in the core imports the CLI, lora/ and adapters/
never reach into train/, serve/ never imports train/, sampling (shared by generate and serve) imports neither,
rank/ (the rank tools) knows nothing of claims/ (LoRA's case), claims/ nothing of serve/, train/ or the playground."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "rankdial"


def imports_of(path: Path) -> set[str]:
    """Absolute rankdial module names that a file imports (relative imports resolved)."""
    package = ".".join(("rankdial",) + path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found |= {name} | {f"{name}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {n for n in found if n == "rankdial" or n.startswith("rankdial.")}


def files(*parts):
    base = ROOT.joinpath(*parts)
    return sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]


RULES = [
    (("quant",), ("rankdial.lora", "rankdial.adapters", "rankdial.train", "rankdial.cli")),
    (("layers",), ("rankdial.lora", "rankdial.quant", "rankdial.adapters", "rankdial.train", "rankdial.models")),
    (("atomic",), ("rankdial.lora", "rankdial.quant", "rankdial.adapters", "rankdial.train", "rankdial.models")),
    (("errors",), ("rankdial.",)),
    (("sampling",), ("rankdial.lora", "rankdial.quant", "rankdial.adapters", "rankdial.train", "rankdial.models",
                     "rankdial.serve", "rankdial.cli")),
    (("config",), ("rankdial.lora", "rankdial.quant", "rankdial.adapters", "rankdial.train")),
    (("lora",), ("rankdial.adapters", "rankdial.train", "rankdial.cli")),
    (("adapters",), ("rankdial.train", "rankdial.cli")),
    (("models",), ("rankdial.train", "rankdial.lora", "rankdial.adapters", "rankdial.cli")),
    (("train",), ("rankdial.cli", "rankdial.serve")),
    (("serve",), ("rankdial.train", "rankdial.cli")),
    (("rank",), ("rankdial.cli", "rankdial.serve", "rankdial.claims")),
    (("claims",), ("rankdial.cli", "rankdial.serve", "rankdial.train", "rankdial.playground")),
    (("local_server",), ("rankdial.lora", "rankdial.quant", "rankdial.adapters", "rankdial.train", "rankdial.models",
                         "rankdial.serve", "rankdial.playground", "rankdial.rank", "rankdial.claims", "rankdial.cli")),
]


@pytest.mark.parametrize("where, forbidden", RULES, ids=[".".join(r[0]) for r in RULES])
def test_imports_run_one_way(where, forbidden):
    bad = [f"{f.relative_to(ROOT)} imports {name}" for f in files(*where) for name in sorted(imports_of(f))
           if any(name == x.rstrip(".") or name.startswith(x if x.endswith(".") else x + ".") or name == x
                  for x in forbidden)]
    assert not bad, bad
