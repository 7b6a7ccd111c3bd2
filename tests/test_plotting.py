"""rankdial.plotting: the one figure/save pair the loss plot, the sweep and the claims report draw with."""

import matplotlib.pyplot as plt
import pytest

from rankdial.plotting import figure, save


def test_save_writes_a_png_atomically_and_releases_the_figure(tmp_path):
    fig, ax = figure()
    ax.plot([1, 2], [3, 4])
    save(fig, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG" and fig.number not in plt.get_fignums()
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary file left beside it


def test_a_failed_save_leaves_the_old_png_and_no_open_figure(tmp_path):
    (tmp_path / "a.png").write_bytes(b"old")
    fig, (left, right) = figure(2)
    left.plot([1, 2], [3, 4])

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")
    fig.savefig = disk_full
    with pytest.raises(OSError):
        save(fig, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes() == b"old" and fig.number not in plt.get_fignums()
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
