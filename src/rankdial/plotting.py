"""The one place rankdial draws its PNGs (the loss plot of a run, a rank sweep, the claims report): matplotlib on
its Agg backend (no display needed), a figure of one row of axes, and a save that is atomic (rankdial.atomic)."""

from __future__ import annotations

from pathlib import Path


def figure(ncols: int = 1, width: float = 5.2, height: float = 3.6):
    """(fig, axes): one row of `ncols` axes, each `width` x `height` inches at 100 dpi (one Axes when ncols is 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width * ncols, height), dpi=100)


def save(fig, png: str | Path) -> None:
    """Lay `fig` out, write it to `png` atomically (the old file stays whole until the new one is complete) and
    release it."""
    import matplotlib.pyplot as plt

    from .atomic import atomic_file

    try:
        fig.tight_layout()
        with atomic_file(png) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
