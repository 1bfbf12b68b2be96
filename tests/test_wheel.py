"""The built wheel, installed outside the checkout: everything the server needs ships in it."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import kernels.native
from tests.server.live_server import start_server

ROOT = Path(__file__).resolve().parents[1]
# What a source distribution holds: the wheel is built from these alone.
SOURCES = ["pyproject.toml", "setup.py", "README.md", "engine", "kernels", "server", "orchestrator"]
# The test extra's (transformers' GGUF loading needs accelerate): the server must not need them.
TEST_ONLY = ["accelerate", "sentence_transformers"]


def _run(*command: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtual environment holding the wheel and nothing else of tokenmill.

    Third-party packages (torch, the default model...) come from this interpreter's
    site-packages through a .pth file, which adds that folder to sys.path without running
    the .pth files inside it, so the checkout's editable install is not seen. Packages only
    the test extra declares are made unimportable, as they are for a user."""
    tmp = tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        source, copy = ROOT / name, tmp / "src" / name
        if source.is_dir():
            shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, copy)
    python = sys.executable
    _run(
        python,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        tmp / "dist",
        tmp / "src",
    )
    (wheel,) = (tmp / "dist").glob("tokenmill-*.whl")
    env = tmp / "venv"
    _run(python, "-m", "venv", "--without-pip", env)
    _run(
        python,
        "-m",
        "pip",
        "--python",
        env / "bin" / "python",
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        wheel,
    )
    purelib = _run(
        env / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"
    )
    Path(purelib.strip(), "third_party.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    hidden = ", ".join(f"{name!r}: None" for name in TEST_ONLY)
    Path(purelib.strip(), "hide_test_only.pth").write_text(
        f"import sys; sys.modules.update({{{hidden}}})\n"
    )
    return env


@pytest.mark.slow
def test_the_installed_wheel_serves_a_chat_completion(venv, tmp_path):
    python = venv / "bin" / "python"
    files = _run(
        python,
        "-c",
        "import engine, kernels, server, orchestrator as o; "
        "print(engine.__file__, kernels.__file__, server.__file__, o.__file__)",
        cwd=tmp_path,
    ).split()
    assert all(Path(f).is_relative_to(venv) for f in files), files
    # The test extra's packages are out of reach: the server below runs without them.
    blocked = subprocess.run(
        [python, "-c", "import accelerate"], capture_output=True, cwd=tmp_path, check=False
    )
    assert blocked.returncode != 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "torch_extensions")
    server = start_server(python=str(python), cwd=tmp_path, env=env)
    # Generous timeouts: the first C++ build (a new install location is a cold build) runs
    # alongside the first request, and the server exits only once it is done.
    try:
        reply = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "What is the capital of Japan?"}],
                "max_tokens": 8,
                "temperature": 0,
            },
            timeout=600,
        ).json()
        assert reply["choices"][0]["message"]["content"].strip()
        assert reply["usage"]["completion_tokens"] >= 1
        # The web page's files are package data.
        page = httpx.get(f"{server.url}/", timeout=60)
        assert page.status_code == 200 and "/static/app.js" in page.text
        for name in ("app.js", "api.js", "markdown.js", "render.js", "tree.js", "chat.css"):
            assert httpx.get(f"{server.url}/static/{name}", timeout=60).status_code == 200
        health = f"{server.url}/health"
        if httpx.get(health, timeout=60).json()["cpu"]["compile_in_use"] != "off":
            deadline = time.monotonic() + 600
            while (state := httpx.get(health, timeout=60).json()["compile"]) == "compiling":
                assert time.monotonic() < deadline, "the C++ build did not finish"
                time.sleep(1)
            assert state == "ready"
            # Built from the wheel's own sources, not a cached build of the checkout's.
            isa = kernels.native.cpu_isa()
            assert list((tmp_path / "torch_extensions").glob(f"*/tokenmill_cpu_{isa}.so"))
    finally:
        assert server.stop(timeout=600) == 0


def test_ninja_next_to_the_interpreter_is_put_on_path(monkeypatch, tmp_path):
    """A virtual environment's python run without activating it: PATH lacks its bin/."""
    scripts = tmp_path / "bin"
    scripts.mkdir()
    ninja = scripts / "ninja"
    ninja.write_text("#!/bin/sh\n")
    ninja.chmod(0o755)
    monkeypatch.setattr(kernels.native.sysconfig, "get_path", lambda name: str(scripts))
    monkeypatch.setenv("PATH", str(tmp_path / "elsewhere"))
    kernels.native.put_ninja_on_path()
    assert shutil.which("ninja") == str(ninja)
    kernels.native.put_ninja_on_path()
    assert os.environ["PATH"].count(str(scripts)) == 1
