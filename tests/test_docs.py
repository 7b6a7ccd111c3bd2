"""Every fenced code block in README.md and docs/*.md runs here, so the docs cannot drift.

What a block needs is written in the Markdown, on an HTML comment line just above its fence (GitHub does not
render it):

    <!-- doc-test: slow; server; needs: out/demo, train.jsonl -->

- no comment: the block runs in the quick suite.
- `slow`: it takes more than a few seconds (training, the demo, a server); it runs with the slow tests.
- `server`: lines of the block that start `rankdial serve` or `rankdial playground` run as servers on
  127.0.0.1 on a free port (`--port N` is appended), are probed over HTTP once they print their address, and
  are stopped with Ctrl-C, all within a time bound.
- `client: COMMAND`: a python block that talks to a server: COMMAND is started as above and the block's
  `http://127.0.0.1:8000` is pointed at its port.
- `needs: A, B`: files the block reads, built cheaply in its temporary folder (see FIXTURES).
- `layout`: a text block drawing src/rankdial/; checked against the files there, both ways.
- `not-run: REASON`: the block cannot run here (e.g. vLLM is not installed); the reason is required, and the
  repository paths it names must exist.

How each language runs, always in a fresh temporary folder:
- python: a subprocess of this interpreter with the repository's src/ first on the path.
  A line `print(x)  # LITERAL` shows output, and the block asserts x == LITERAL.
- bash: line by line (a trailing backslash continues a line), each line must exit 0; `rankdial`, `python` and
  `torchrun` are this virtual environment's, importing the repository's src/.
- toml / yaml: parsed, and a training config (its first line names it, `# run.toml`) is loaded with the
  training config loader, which checks every key and value.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SAMPLES = ROOT / "src" / "rankdial" / "models" / "default" / "samples"
MARKER = re.compile(r"^<!-- doc-test: (.*) -->$")
FENCE = re.compile(r"^(```+)\s*([\w+-]*)\s*$")
LANGUAGES = {"python", "bash", "toml", "yaml", "text"}
DIRECTIVES = {"slow", "server", "client", "needs", "layout", "not-run"}
SERVER_COMMANDS = {("rankdial", "serve"): "/health", ("rankdial", "playground"): "/"}
BLOCK_TIMEOUT_S = 900  # a bound, not a measurement: the slowest block (the demo) takes a few minutes


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marks: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse_marks(text: str) -> dict:
    marks, rest = {}, text
    while rest.strip():
        part, _, rest = rest.partition(";")
        name, _, value = part.partition(":")
        if name.strip() == "not-run":  # the reason is free text, semicolons and all
            value, rest = value + (";" + rest if rest else ""), ""
        marks[name.strip()] = value.strip()
    return marks


def read_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, each with the doc-test marks of the comment line just above it."""
    lines, blocks, i = page.read_text().splitlines(), [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == fence.group(1))
        above = lines[i - 1] if i else ""
        marker = MARKER.match(above)
        blocks.append(Block(page, i + 1, fence.group(2), "\n".join(lines[i + 1:end]) + "\n",
                            parse_marks(marker.group(1)) if marker else {}))
        i = end + 1
    return blocks


BLOCKS = [b for page in PAGES for b in read_blocks(page)]


# ---- the pages themselves ----

def test_every_block_has_a_known_language_and_marks():
    bad = []
    for b in BLOCKS:
        if b.lang not in LANGUAGES:
            bad.append(f"{b.id}: fence language {b.lang!r}; use one of {sorted(LANGUAGES)}")
        if set(b.marks) - DIRECTIVES:
            bad.append(f"{b.id}: unknown doc-test directive(s) {sorted(set(b.marks) - DIRECTIVES)}")
        if "not-run" in b.marks and len(b.marks["not-run"]) < 15:
            bad.append(f"{b.id}: not-run needs a reason, got {b.marks['not-run']!r}")
        if b.lang == "text" and "layout" not in b.marks and "not-run" not in b.marks:
            bad.append(f"{b.id}: a text block must be checked (layout) or say why not (not-run: ...)")
        for name in filter(None, (n.strip() for n in b.marks.get("needs", "").split(","))):
            if name not in FIXTURES:
                bad.append(f"{b.id}: needs {name!r}, which no fixture builds (known: {sorted(FIXTURES)})")
    assert not bad, "\n".join(bad)


def test_every_marker_sits_above_a_fence():
    bad = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if "doc-test" in line and (not MARKER.match(line) or i + 1 >= len(lines) or not FENCE.match(lines[i + 1])):
                bad.append(f"{page.relative_to(ROOT)}:{i + 1}: {line.strip()!r} is not a marker line just above "
                           "a fence")
    assert not bad, "\n".join(bad)


def test_the_readme_is_a_short_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    for command in ("./dev.sh demo", "./dev.sh test"):  # the way to develop
        assert command in text
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in text, f"README.md does not link docs/{page.name}"


def test_no_indented_code_blocks():
    """An indented code block would escape the fenced-block runner: every block is fenced."""
    bad = []
    for page in PAGES:
        lines, fenced = page.read_text().splitlines(), False
        for i, line in enumerate(lines):
            fenced ^= bool(FENCE.match(line)) and not line.startswith(" ")
            before = next((l for l in reversed(lines[:i]) if l.strip()), "")
            if (not fenced and line.startswith("    ") and i and not lines[i - 1].strip()
                    and not before.startswith((" ", "-", "*", "|")) and not re.match(r"\d+\. ", before)):
                bad.append(f"{page.relative_to(ROOT)}:{i + 1}: an indented code block; fence it")
    assert not bad, "\n".join(bad)


def test_the_command_line_page_lists_every_verb():
    from rankdial.cli import build_parser

    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    listed = re.findall(r"^\| `rankdial ([\w-]+)", (ROOT / "docs" / "cli.md").read_text(), re.M)
    assert sorted(listed) == sorted(verbs.choices)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower().replace("`", ""))
            found.add(title.replace(" ", "-"))
    return found


def test_links_are_relative_and_resolve():
    bad = []
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if path.startswith("/") or not dest.is_relative_to(ROOT):
                bad.append(f"{page.name}: {target} leaves the repository")
            elif not dest.exists():
                bad.append(f"{page.name}: {target} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{page.name}: {target}: no heading with that anchor")
        for path in re.findall(r"`((?:src|tests|benchmarks|scripts|docs)/[\w./-]*)", text):
            if not (ROOT / path).exists():
                bad.append(f"{page.name}: `{path}` is not in the repository")
        if "../shared" in text or "/work/" in text:
            bad.append(f"{page.name} refers to a file outside the repository")
    assert not bad, "\n".join(bad)


def _peft_table(page: Path) -> str:
    lines = page.read_text().splitlines()
    start = lines.index("| PEFT | rankdial |")
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return "\n".join(lines[start:end])


def test_the_peft_table_is_the_same_on_the_front_page_and_in_the_docs():
    assert _peft_table(ROOT / "README.md") == _peft_table(ROOT / "docs" / "from-peft.md")


# ---- fixtures: what a block may need, built cheaply ----

def _copy_sample(name: str):
    return lambda tmp: shutil.copy(SAMPLES / name, tmp / {"pydoc_qa.jsonl": "train.jsonl",
                                                           "pydoc_qa_eval.jsonl": "eval.jsonl"}[name])


def _page_config(tmp: Path, page: Path, name: str) -> None:
    """The page's own config block whose first line names it (`# run.toml`)."""
    block = next(b for b in read_blocks(page) if b.code.startswith(f"# {name}"))
    (tmp / name).write_text(block.code)


def _demo_adapters(tmp: Path) -> None:
    """out/demo/lora and out/demo/qlora as `rankdial demo` leaves them, but random and tiny (seconds, not minutes)."""
    sys.path.insert(0, str(ROOT / "tests" / "serve"))
    try:
        from engine_helpers import make_adapter
    finally:
        sys.path.pop(0)
    for seed, name in enumerate(["lora", "qlora"]):
        make_adapter(tmp / "out" / "demo" / name, seed=seed)


FIXTURES = {
    "train.jsonl": _copy_sample("pydoc_qa.jsonl"),
    "eval.jsonl": _copy_sample("pydoc_qa_eval.jsonl"),
    "run.toml": lambda tmp: _page_config(tmp, ROOT / "docs" / "training.md", "run.toml"),
    "out/demo": _demo_adapters,
}


# ---- running blocks ----

def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                               if p and Path(p).resolve() != (ROOT / "src")])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server line of a block, run on a free port and stopped with Ctrl-C within bounded time."""

    def __init__(self, argv: list[str], cwd: Path, probe: str):
        self.port, self.probe, self.output = _free_port(), probe, []
        self.proc = subprocess.Popen(argv + ["--port", str(self.port)], cwd=cwd, env=_env(), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()

    def text(self) -> str:
        return "".join(self.output)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while f"127.0.0.1:{self.port}" not in self.text():
            assert self.proc.poll() is None, f"the server exited with {self.proc.returncode}:\n{self.text()}"
            assert time.monotonic() < deadline, f"the server did not print its address in {timeout} s:\n{self.text()}"
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{self.probe}", timeout=30) as reply:
            assert reply.status == 200

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                pytest.fail(f"the server did not stop within 60 s of Ctrl-C:\n{self.text()}")
        assert self.proc.returncode in (0, 130), f"the server exited with {self.proc.returncode}:\n{self.text()}"


def _server_argv(line: str) -> tuple[list[str], str] | None:
    argv = shlex.split(line, comments=True)
    probe = SERVER_COMMANDS.get(tuple(argv[:2]))
    return (argv, probe) if probe else None


def _run(argv_or_line, cwd: Path, shell: bool) -> None:
    done = subprocess.run(argv_or_line, cwd=cwd, env=_env(), shell=shell, executable="/bin/bash" if shell else None,
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert done.returncode == 0, \
        f"{argv_or_line!r} exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def bash_lines(code: str) -> list[str]:
    lines, pending = [], ""
    for raw in code.splitlines():
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip() and not pending.strip().startswith("#"):
            lines.append(pending.strip())
        pending = ""
    return lines


def run_bash(block: Block, tmp: Path) -> None:
    for line in bash_lines(block.code):
        server = _server_argv(line) if "server" in block.marks else None
        if server:
            running = Server(server[0], tmp, server[1])
            try:
                running.wait_ready()
            finally:
                running.stop()
        else:
            _run(line, tmp, shell=True)


def checked_prints(code: str) -> str:
    """`print(x)  # LITERAL` shows output: the line also asserts that x equals the literal it shows."""
    out = []
    for line in code.splitlines():
        shown = re.match(r"^(\s*)print\((.*)\)\s+#\s*(.+?)\s*$", line)
        try:
            expected = ast.literal_eval(shown.group(3)) if shown else None
        except (ValueError, SyntaxError):
            shown = None
        if shown:
            indent, expr = shown.group(1), shown.group(2)
            message = repr(f"the page shows {expected!r}, got ")
            out.append(f"{indent}assert ({expr}) == {expected!r}, {message} + repr({expr})")
        out.append(line)
    return "\n".join(out) + "\n"


def run_python(block: Block, tmp: Path) -> None:
    code, server = checked_prints(block.code), None
    if "client" in block.marks:
        argv, probe = _server_argv(block.marks["client"])
        server = Server(argv, tmp, probe)
        code = code.replace("http://127.0.0.1:8000", f"http://127.0.0.1:{server.port}")
    try:
        if server:
            server.wait_ready()
        (tmp / "doc_block.py").write_text(code)
        _run([sys.executable, "doc_block.py"], tmp, shell=False)
    finally:
        if server:
            server.stop()


def run_config(block: Block, tmp: Path) -> None:
    from rankdial.train.config import make_config

    values = tomllib.loads(block.code) if block.lang == "toml" else yaml.safe_load(block.code)
    assert isinstance(values, dict) and values, f"{block.id}: an empty config"
    first = block.code.splitlines()[0]
    name = first[2:].split()[0] if first.startswith("# ") else f"block.{block.lang}"
    (tmp / name).write_text(block.code)
    make_config(tmp / name)  # every key known, every value valid


def check_layout(block: Block, tmp: Path) -> None:
    """The drawn tree names every module and package of src/rankdial/ and nothing that is not there."""
    package = ROOT / "src" / "rankdial"
    drawn, stack = set(), []
    for raw in block.code.splitlines()[1:]:  # the first line is the root, src/rankdial/
        indent, words = len(raw) - len(raw.lstrip()), raw.split()
        if not words or indent % 2 or indent > 8 or not re.fullmatch(r"[\w.]+(\.py|/)", words[0]):
            continue  # a description's continuation line
        stack[indent // 2 - 1:] = []
        drawn.add("/".join(stack + [words[0].rstrip("/")]))
        if words[0].endswith("/"):
            stack.append(words[0].rstrip("/"))
    actual = {str(p.relative_to(package)) for p in package.rglob("*.py") if p.name != "__init__.py"}
    actual |= {str(p.relative_to(package)) for p in package.rglob("*") if p.is_dir() and "__pycache__" not in p.parts}
    missing = sorted(actual - drawn)
    extra = sorted(d for d in drawn if not (package / d).exists())
    assert not missing and not extra, f"{block.id}: not drawn: {missing}; drawn but absent: {extra}"


def check_not_run(block: Block, tmp: Path) -> None:
    """A block that cannot run here still names only repository paths that exist."""
    missing = [w for w in re.findall(r"(?<![\w/.-])((?:benchmarks|scripts|src|tests|docs)/[\w./-]+)", block.code)
               if not (ROOT / w).exists()]
    assert not missing, f"{block.id} names {missing}, which the repository does not hold"
    dev_sh = (ROOT / "dev.sh").read_text()
    jobs = [job for job in re.findall(r"\./dev\.sh (\w+)", block.code) if not re.search(rf"^\s*{job}\)", dev_sh, re.M)]
    assert not jobs, f"{block.id} runs ./dev.sh {jobs}, which dev.sh does not offer"


def run_block(block: Block, tmp: Path) -> None:
    if "not-run" in block.marks:
        return check_not_run(block, tmp)
    for name in filter(None, (n.strip() for n in block.marks.get("needs", "").split(","))):
        FIXTURES[name](tmp)
    if "layout" in block.marks:
        return check_layout(block, tmp)
    {"python": run_python, "bash": run_bash, "toml": run_config, "yaml": run_config}[block.lang](block, tmp)


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if "slow" in b.marks else [])
                                   for b in BLOCKS])
def test_block(block, tmp_path):
    run_block(block, tmp_path)


def test_a_failing_block_fails(tmp_path):
    """The runner is not a formality: a line that fails, or a config key that does not exist, is an error."""
    for lang, code, marks in [("bash", "true\nexit 3\n", {}), ("python", "raise SystemExit(3)\n", {}),
                              ("toml", "# run.toml\ndata = 'x.jsonl'\nno_such_key = 1\n", {}),
                              ("bash", "./dev.sh no-such-job\n", {"not-run": "a reason long enough"}),
                              ("bash", "python benchmarks/bench_none.py\n", {"not-run": "a reason long enough"})]:
        with pytest.raises((AssertionError, Exception)):
            run_block(Block(ROOT / "README.md", 0, lang, code, marks), tmp_path)


def test_the_layout_check_sees_a_missing_module(tmp_path):
    block = next(b for b in BLOCKS if "layout" in b.marks)
    lines = block.code.splitlines()
    dropped = Block(block.page, block.line, "text", "\n".join(l for l in lines if "memory.py" not in l) + "\n")
    with pytest.raises(AssertionError, match="memory"):
        check_layout(dropped, tmp_path)


def test_shown_output_is_checked(tmp_path):
    run_block(Block(ROOT / "README.md", 0, "python", "print(sorted([3, 1]))  # [1, 3]\n"), tmp_path)
    with pytest.raises(AssertionError, match="the page shows"):
        run_block(Block(ROOT / "README.md", 0, "python", "print(sorted([3, 1]))  # [3, 1]\n"), tmp_path)


def test_bash_lines_join_continuations():
    assert bash_lines("# c\nvllm serve a \\\n    --x 1   # y\n\nls\n") == ["vllm serve a      --x 1   # y", "ls"]
    assert parse_marks("slow; needs: a, b; not-run: why; it cannot") == {"slow": "", "needs": "a, b",
                                                                         "not-run": "why; it cannot"}
