"""EngineArgs: what the CPU defaults resolve to, and clear errors for bad values."""

from __future__ import annotations

import argparse

import pytest
import torch

import kernels.native
from engine.args import EngineArgs
from engine.cpu_path import cpu_path

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


# The measured fastest mode per kernel target (docs/performance.md): tokenmill's int8 GEMM
# where it has vector code, float32 on ATen's GEMM where it has none.
FASTEST = {
    "avx512_vnni": ("w8a8", "background"),
    "avx_vnni": ("w8a8", "background"),
    "avx2": ("w8a8", "background"),
    "generic": ("none", "off"),
}


@pytest.mark.parametrize("isa", kernels.native.runnable_isas())
def test_cpu_defaults_are_the_fastest_mode_for_the_instruction_set(isa, monkeypatch):
    monkeypatch.setenv(kernels.native.ISA_ENV, isa)
    args = EngineArgs()
    assert args.resolve_dtype(CPU) == torch.float32
    assert (args.resolve_quantization(CPU), args.resolve_compile(CPU)) == FASTEST[isa]
    assert args.resolve_kv_cache_dtype(CPU) == torch.bfloat16
    path = cpu_path()
    assert (path.isa, path.forced) == (isa, isa != kernels.native.detected_isa())
    assert path.reason and path.as_dict()["quantization"] == FASTEST[isa][0]


def test_a_bad_forced_instruction_set_fails_clearly(monkeypatch):
    monkeypatch.setenv(kernels.native.ISA_ENV, "avx9000")
    with pytest.raises(ValueError, match="TOKENMILL_CPU_ISA"):
        EngineArgs().resolve_quantization(CPU)


def test_an_explicit_dtype_keeps_the_exact_model():
    args = EngineArgs(dtype="float32")
    assert args.resolve_quantization(CPU) == "none"
    assert args.resolve_kv_cache_dtype(CPU) == torch.float32
    assert args.resolve_compile(CPU) == "off"


@pytest.mark.parametrize(
    ("given", "name"),
    [
        ("half", "float16"),
        ("float", "float32"),
        (torch.float16, "float16"),
        (torch.bfloat16, "bfloat16"),
        (torch.float32, "float32"),
        ("auto", "auto"),
    ],
)
def test_vllm_dtype_spellings_are_the_same_dtypes(given, name):
    """vLLM scripts pass LLM(..., dtype="half") or a torch.dtype; each is that dtype,
    with the CPU speed defaults off as for any explicit dtype."""
    args = EngineArgs(dtype=given)
    assert args.dtype == name
    assert args.resolve_dtype(CUDA) == EngineArgs(dtype=name).resolve_dtype(CUDA)
    assert args.resolve_quantization(CPU) == EngineArgs(dtype=name).resolve_quantization(CPU)


def test_vllm_default_quantization_none_is_auto():
    """vLLM's LLM(quantization=None), its default, picks this engine's default mode."""
    args = EngineArgs(quantization=None)
    assert args.quantization == "auto"
    assert args.resolve_quantization(CPU) == EngineArgs().resolve_quantization(CPU)


def test_the_server_takes_vllm_dtype_spellings():
    from engine.serve import build_parser, engine_args

    assert engine_args(build_parser().parse_args(["--dtype", "half"])).dtype == "float16"


def test_cuda_defaults_quantize_nothing():
    args = EngineArgs()
    assert args.resolve_dtype(CUDA) == torch.bfloat16
    assert args.resolve_quantization(CUDA) == "none"
    assert args.resolve_kv_cache_dtype(CUDA) == torch.bfloat16
    assert args.resolve_compile(CUDA) == "off"


def test_long_prompts_are_prefilled_in_capped_chunks_on_cpu_only_by_default():
    assert EngineArgs().resolve_long_prefill_token_threshold(CPU) == 256
    assert EngineArgs().resolve_long_prefill_token_threshold(CUDA) == 0
    for given, device in ((0, CPU), (64, CUDA)):
        args = EngineArgs(long_prefill_token_threshold=given)
        assert args.resolve_long_prefill_token_threshold(device) == given


def test_explicit_choices_win():
    args = EngineArgs(dtype="float32", quantization="int4", kv_cache_dtype="float16", compile="on")
    assert args.resolve_quantization(CPU) == "int4"
    assert args.resolve_kv_cache_dtype(CPU) == torch.float16
    assert args.resolve_compile(CPU) == "on"


@pytest.mark.parametrize(
    "field,value",
    [
        ("quantization", "int3"),
        ("kv_cache_dtype", "fp8"),
        ("dtype", "double"),
        ("dtype", torch.float64),
        ("dtype", None),
        ("compile", "yes"),
        ("max_model_len", 0),
        ("seed", 1.5),
        ("seed", True),
        ("long_prefill_token_threshold", -1),
        ("long_prefill_token_threshold", 2.5),
    ],
)
def test_bad_values_are_rejected_with_the_field_name(field, value):
    with pytest.raises(ValueError, match=field):
        EngineArgs(**{field: value})


def test_server_flags_reach_the_engine_args():
    from engine.serve import build_parser, engine_args

    args = build_parser().parse_args(
        [
            "--quantization",
            "int8",
            "--kv-cache-dtype",
            "float32",
            "--num-threads",
            "1",
            "--compile",
            "off",
            "--enforce-eager",
            "--trust-remote-code",
            "--long-prefill-token-threshold",
            "0",
        ]
    )
    options = engine_args(args)
    assert options.long_prefill_token_threshold == 0
    chosen = (options.quantization, options.kv_cache_dtype, options.num_threads, options.compile)
    assert chosen == ("int8", "float32", 1, "off")
    assert options.enforce_eager and options.trust_remote_code
    defaults = engine_args(build_parser().parse_args([]))
    assert (defaults.quantization, defaults.kv_cache_dtype, defaults.compile) == ("auto",) * 3


def test_serve_help_works_without_sched_getaffinity(monkeypatch, capsys):
    """macOS has no os.sched_getaffinity: the thread default falls back to every core."""
    from engine import serve

    monkeypatch.delattr(serve.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(serve.os, "cpu_count", lambda: 3)
    with pytest.raises(SystemExit) as exit_info:
        serve.build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--num-threads" in capsys.readouterr().out
    assert serve.build_parser().parse_args([]).num_threads == 3


def test_vllm_enforce_eager_turns_the_compile_step_off_and_trust_remote_code_is_accepted():
    """vLLM scripts pass LLM(..., enforce_eager=True, trust_remote_code=True)."""
    args = EngineArgs(enforce_eager=True, trust_remote_code=True)
    assert args.resolve_compile(CPU) == "off"
    assert EngineArgs(enforce_eager=True, compile="off").resolve_compile(CPU) == "off"
    with pytest.raises(ValueError, match="enforce_eager"):
        EngineArgs(enforce_eager=True, compile="on")


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--port", "70000", "from 0 to 65535"),
        ("--port", "-5", "from 0 to 65535"),
        ("--port", "http", "must be an integer"),
        ("--shutdown-timeout", "-1", ">= 0"),
        ("--max-upload-mb", "-1", ">="),
        ("--max-upload-mb", "nan", ">="),
        ("--max-sequences-per-user", "-1", ">= 0"),
        ("--max-waiting-requests", "-1", ">= 0"),
        ("--max-num-seqs", "many", "must be an integer"),
        ("--api-key", "", "must not be empty"),
        ("--api-key", "key\r", "no whitespace around it"),
        ("--api-key", " key", "no whitespace around it"),
        ("--api-key", "cl\u00e9", "printable ASCII"),
        ("--database-url", "mysql://x@127.0.0.1:1/x", "SQLite or PostgreSQL, not 'mysql'"),
        ("--database-url", "notaurl", "not a database URL"),
    ],
)
def test_bad_server_flags_are_refused_by_the_parser_naming_the_rule(flag, value, message, capsys):
    """At once, before the model loads, and without naming an internal function."""
    from engine.serve import build_parser

    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args([flag, value])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert message in err and flag in err and "parse" not in err


@pytest.mark.parametrize("device", ["bogus", "tpu", "cuda:99"])
def test_a_device_this_machine_does_not_have_is_a_clear_error(device):
    with pytest.raises(ValueError, match="device"):
        EngineArgs(device=device)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--block-size", "3"], "block_size must be a power of two"),
        (["--gpu-memory-utilization", "2"], "gpu_memory_utilization must be in (0, 1]"),
        (["--kv-cache-memory-gib", "nan"], "kv_cache_memory_gib must be a finite number > 0"),
        (["--kv-cache-memory-gib", "inf"], "kv_cache_memory_gib must be a finite number > 0"),
        (["--seed", str(2**64)], "seed must be None or an integer in"),
        (["--device", "tpu"], "device must be"),
        (["--enforce-eager", "--compile", "on"], "enforce_eager"),
        (
            ["--max-model-len", "100000"],
            "max_model_len 100000 is above the context window of smollm2-135m-instruct: "
            "8192 tokens",
        ),
    ],
)
def test_bad_engine_flags_are_refused_before_anything_loads(
    flags, message, tmp_path, capsys, monkeypatch
):
    """The engine's option rules are a usage error (status 2, one line after the usage), as
    argparse's own are, before the data directory is locked or the model loaded."""
    from engine import serve

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(serve, "AsyncLLM", load)
    with pytest.raises(SystemExit) as refused:
        serve.main([*flags, "--port", "0", "--data-dir", str(tmp_path / "data")])
    assert refused.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_the_operator_key_may_come_from_the_environment_where_ps_cannot_show_it():
    """TOKENMILL_API_KEY (as vLLM's VLLM_API_KEY) when no --api-key is given; the flags win;
    a value no client could present (empty, a trailing '\\r') is refused as the flag's is."""
    from engine.serve import operator_keys

    assert operator_keys([], {"TOKENMILL_API_KEY": "sk-env"}) == ["sk-env"]
    assert operator_keys(["sk-flag"], {"TOKENMILL_API_KEY": "sk-env"}) == ["sk-flag"]
    assert operator_keys([], {}) == []
    for bad in ("", "sk-env\r"):
        with pytest.raises(argparse.ArgumentTypeError):
            operator_keys([], {"TOKENMILL_API_KEY": bad})
