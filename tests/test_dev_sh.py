"""dev.sh: apt-get (for chromium) runs only in the setup step, never on a later `./dev.sh test` or `demo`; the
setup step prints its progress on stdout, leaving stderr for what went wrong."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

import rankdial

ROOT = Path(rankdial.__file__).resolve().parents[2]
TOOLS = ("bash", "cksum", "cut", "dirname", "id", "touch", "rm", "cat", "grep")


def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def sandbox(tmp_path):
    """A copy of dev.sh and pyproject.toml, and a PATH with the shell tools it needs but no chromium, where
    `apt-get` and `sudo` only record that they were called, and a python that records what it was asked."""
    if not shutil.which("bash") or not shutil.which("cksum"):
        pytest.skip("needs bash and cksum")
    shutil.copy2(ROOT / "dev.sh", tmp_path / "dev.sh")
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    log = tmp_path / "calls.log"
    _script(bin_dir / "apt-get", f'echo "apt-get $*" >> {log}\n')
    _script(bin_dir / "sudo", f'echo "sudo $*" >> {log}\n"$@"\n')
    _script(bin_dir / "fakepython", f'echo "python $*" >> {log}\nexit 1\n')  # a setup that goes no further
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "PYTHON": str(bin_dir / "fakepython")}
    return tmp_path, env, log


def _stamp(folder: Path) -> None:
    checksum = subprocess.run(["cksum"], input=(folder / "pyproject.toml").read_bytes(), capture_output=True,
                              check=True).stdout.split()[0].decode()
    (folder / ".venv" / "bin").mkdir(parents=True)
    (folder / ".venv" / f".setup-{checksum}").touch()
    _script(folder / ".venv" / "bin" / "python", 'echo "venv-python $*"\n')


def test_a_set_up_checkout_does_not_run_apt_get(sandbox):
    folder, env, log = sandbox
    _stamp(folder)
    for job in (["setup"], ["test", "-q"]):
        proc = subprocess.run([str(folder / "dev.sh"), *job], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
    assert not log.exists() or "apt-get" not in log.read_text()
    assert proc.stdout == "venv-python -m pytest -q\n"  # the job itself still ran


def test_the_setup_step_installs_chromium_when_missing(sandbox):
    folder, env, log = sandbox
    proc = subprocess.run([str(folder / "dev.sh"), "setup"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=30)
    calls = log.read_text()
    assert "apt-get update" in calls and "apt-get install -y -qq chromium" in calls
    assert "python -m venv .venv" in calls  # then it set up .venv (which this fake python refuses)
    assert proc.returncode != 0
    assert "installing Debian's chromium" in proc.stdout and "setting up .venv" in proc.stdout
    assert "installing" not in proc.stderr
