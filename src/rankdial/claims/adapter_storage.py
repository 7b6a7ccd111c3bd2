"""Claim 5, one base + N adapters against N full copies: bytes on disk, from an adapter of the default model
and the base's own file, both as written now.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..config import LoraConfig
from ..lora import inject
from ..memory import MIB
from ..models.loading import default_model_path, load_model, resolve_model
from ..plotting import figure, save

KEY, TITLE = "adapters", "5. One base + N adapters against N full copies"


def adapters_vs_copies(ns: list[int], rank: int = 16) -> dict:
    """Bytes on disk: one base plus N adapters against N fine-tuned full copies, from files written now."""
    from ..adapters import save_adapter

    base_file = default_model_path() / "model.safetensors"
    model, _ = load_model(resolve_model("default"))
    inject(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_adapter(model, Path(tmp) / "a")
        adapter_bytes = sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
    base_bytes = base_file.stat().st_size
    return {"rank": rank, "base_bytes": base_bytes, "adapter_bytes": adapter_bytes,
            "adapter_share_percent": 100 * adapter_bytes / base_bytes,
            "rows": [{"n": n, "base_plus_adapters": base_bytes + n * adapter_bytes, "full_copies": n * base_bytes}
                     for n in ns]}


def plot(f: dict, png: Path) -> None:
    fig, ax = figure()
    ns = [row["n"] for row in f["rows"]]
    ax.plot(ns, [row["full_copies"] / MIB for row in f["rows"]], "o-", label="N full copies")
    ax.plot(ns, [row["base_plus_adapters"] / MIB for row in f["rows"]], "o-", label="1 base + N adapters")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N fine-tuned variants")
    ax.set_ylabel("MiB on disk")
    ax.set_title(f"default model; adapter r={f['rank']} is {f['adapter_share_percent']:.1f}% of the base")
    ax.legend()
    save(fig, png)


def section(f: dict) -> list[str]:
    rows = [f"| {r['n']} | {r['base_plus_adapters'] / MIB:.1f} | {r['full_copies'] / MIB:.1f} | "
            f"{r['full_copies'] / r['base_plus_adapters']:.1f}× |" for r in f["rows"]]
    return [f"Default model: base file {f['base_bytes']:,} bytes; one adapter (r = {f['rank']}, every linear layer, "
            f"as saved) {f['adapter_bytes']:,} bytes ({f['adapter_share_percent']:.1f}% of the base).", "",
            "| N | 1 base + N adapters (MiB) | N full copies (MiB) | saved |", "|---|---|---|---|", *rows]
