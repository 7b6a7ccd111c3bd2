#!/usr/bin/env bash
# Set up the development environment (once; again when pyproject.toml changes) and run a job.
#   ./dev.sh demo [args]   run the main job on the embedded default
#   ./dev.sh test [args]   run the whole test suite (args go to pytest)
#   ./dev.sh setup         only set up .venv
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
# Nothing here downloads from the Hugging Face Hub (models are local; bitsandbytes would otherwise try to fetch an
# optional kernel at import, in the setup check below).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
stamp=".venv/.setup-$(cksum < pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  # Progress goes to stdout: stderr is for what went wrong.
  # The playground's browser tests drive Debian's chromium (never a browser download); installed here, in the
  # setup step, so later runs do not call apt-get.
  if ! command -v chromium >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser tests (apt-get)..."
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; } \
      || echo "could not install chromium (apt-get install -y chromium): the browser tests will fail" >&2
  fi
  echo "setting up .venv (torch==2.13.0, rankdial and its test dependencies)..."
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  # Pinned here, not in pyproject: on these machines torch==2.13.0 is a local CPU wheel, while a bare
  # `torch` would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import torch, rankdial, peft, bitsandbytes, fastapi, uvicorn, openai, playwright" || { echo "setup failed" >&2; exit 1; }
  rm -f .venv/.setup-*
  touch "$stamp"
fi
job=${1:-}
[ $# -gt 0 ] && shift
case "$job" in
  demo) exec .venv/bin/rankdial demo "$@" ;;
  test) exec .venv/bin/python -m pytest "$@" ;;
  setup) ;;
  *) echo "usage: ./dev.sh demo|test|setup [args]" >&2; exit 2 ;;
esac
