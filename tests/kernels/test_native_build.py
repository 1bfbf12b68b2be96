"""Building and choosing tokenmill's C++ kernels (kernels/native.py): the instruction-set
choice and its override, and the build's behaviour across processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

import kernels.native


def test_the_detected_target_is_the_fastest_the_cpu_runs(monkeypatch):
    monkeypatch.delenv(kernels.native.ISA_ENV, raising=False)
    runnable = kernels.native.runnable_isas()
    assert runnable[-1] == "generic"  # portable C++ runs everywhere
    assert runnable == [isa for isa in kernels.native.ISAS if isa in runnable]
    assert kernels.native.cpu_isa() == runnable[0]
    features = kernels.native.cpu_features()
    assert ("avx512_vnni" in runnable) == features["avx512_vnni"]
    assert ("avx_vnni" in runnable) == features["avx_vnni"]
    assert ("avx2" in runnable) == features["avx2_fma"]


@pytest.mark.parametrize(
    ("flags", "isas"),
    [
        ("avx2 fma f16c avx_vnni", ["avx_vnni", "avx2", "generic"]),  # Alder Lake and later
        ("avx2 fma f16c", ["avx2", "generic"]),  # Zen 2/3, Skylake client
        ("sse4_2", ["generic"]),
    ],
)
def test_an_avx_vnni_cpu_without_avx512_runs_the_avx_vnni_target(monkeypatch, flags, isas):
    monkeypatch.setattr(kernels.native, "cpu_flags", lambda: frozenset(flags.split()))
    monkeypatch.setattr(kernels.native.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv(kernels.native.ISA_ENV, raising=False)
    assert kernels.native.runnable_isas() == isas and kernels.native.cpu_isa() == isas[0]


@pytest.mark.parametrize("isa", kernels.native.runnable_isas())
def test_the_environment_forces_any_target_the_cpu_runs(monkeypatch, isa):
    monkeypatch.setenv(kernels.native.ISA_ENV, isa.upper())
    assert kernels.native.cpu_isa() == isa


def test_the_environment_rejects_unknown_and_unrunnable_targets(monkeypatch):
    monkeypatch.setenv(kernels.native.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="TOKENMILL_CPU_ISA must be one of"):
        kernels.native.cpu_isa()
    monkeypatch.setattr(kernels.native, "runnable_isas", lambda: ["generic"])
    monkeypatch.setenv(kernels.native.ISA_ENV, "avx2")
    with pytest.raises(ValueError, match="this CPU runs only"):
        kernels.native.cpu_isa()
    with pytest.raises(ValueError, match="cannot run the avx2 kernels"):
        kernels.native.load("avx2")


def test_each_target_builds_into_its_own_directory():
    directories = {kernels.native.build_directory(isa) for isa in kernels.native.ISAS}
    assert len(directories) == len(kernels.native.ISAS)


def test_a_change_to_any_file_the_build_includes_rebuilds_it(monkeypatch, tmp_path):
    """The build compiles one source, kernels.cpp, which includes the kernel files and
    headers; PyTorch's loader rebuilds only when that source or a flag changes, so every file
    it includes must feed the flag `_included_flag` hashes."""
    csrc = kernels.native._SOURCE.parent
    included, pending = set(), [kernels.native._SOURCE]
    while pending:
        for line in pending.pop().read_text().splitlines():
            if line.startswith('#include "') and (name := line.split('"')[1]) not in included:
                included.add(name)
                pending.append(csrc / name)
    assert included == {f.name for f in kernels.native._INCLUDED}
    # Every kernel file in the package is part of the build.
    assert {f.name for f in csrc.glob("*.cpp")} - included == {kernels.native._SOURCE.name}
    copies = []
    for f in kernels.native._INCLUDED:
        copies.append(tmp_path / f.name)
        copies[-1].write_bytes(f.read_bytes())
    monkeypatch.setattr(kernels.native, "_INCLUDED", copies)
    flags = {kernels.native._included_flag()}
    for copy in copies:
        copy.write_bytes(copy.read_bytes() + b"\n")
        flags.add(kernels.native._included_flag())
    assert len(flags) == len(copies) + 1


def test_importing_the_engine_leaves_no_import_hooks_to_the_compile_thread():
    """setuptools (under torch.utils.cpp_extension) edits sys.meta_path on its first import,
    which races with imports on other threads; the engine's import must have done it."""
    code = (
        "import sys, engine.serve; "
        "assert 'torch.utils.cpp_extension' in sys.modules and 'setuptools' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_build_killed_midway_does_not_block_later_loads():
    """PyTorch's loader leaves its `lock` file behind when its process dies mid-build, and
    then waits for it forever; `load` clears such a leftover."""
    directory = kernels.native.build_directory()
    (directory / "lock").touch()
    code = "import kernels.native as n; n.load()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert not (directory / "lock").exists()
