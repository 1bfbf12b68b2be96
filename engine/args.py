"""Engine options with defaults that work out of the box on CPU and on a GPU."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.compilation import COMPILE_MODES
from engine.cpu_path import cpu_path
from engine.linear import QUANTIZATIONS
from engine.sampling_params import SEED_MAX, SEED_MIN, is_int

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# vLLM's other names for the same dtypes, which its scripts pass as `dtype`.
DTYPE_ALIASES = {"half": "float16", "float": "float32"}
# long_prefill_token_threshold's CPU default (docs/performance.md, "Long prompts").
CPU_PREFILL_CHUNK = 256


@dataclass
class EngineArgs:
    model: str = "smollm2-135m-instruct"
    # "auto": float32 on CPU, bfloat16 on CUDA. vLLM's "half" and "float" and a torch.dtype
    # (torch.float16) are taken too, and stored under their DTYPES name.
    dtype: str = "auto"
    # "auto": on CPU when dtype is also "auto", the fastest mode measured for the CPU's
    # instruction set (engine/cpu_path.py: "w8a8", int8 weights and int8 activations with
    # SmoothQuant calibration, where tokenmill's int8 GEMM runs), else "none". An explicit
    # dtype="float32" therefore keeps the checkpoint's exact weights (and transformers'
    # greedy output). See engine/linear.py and docs/performance.md for the trade. None,
    # vLLM's default ("as the checkpoint says"), is stored as "auto".
    quantization: str | None = "auto"
    # "auto": bfloat16 on CPU when dtype is also "auto" (it halves the bytes decode attention
    # gathers every layer), else the model's dtype.
    kv_cache_dtype: str = "auto"
    # The CPU compile step (engine/compilation.py: C++ kernels, torch.compile of the layers).
    # "auto": on CPU when dtype is also "auto", the mode engine/cpu_path.py measured fastest
    # for the instruction set ("background": serve eagerly at once, switch to the compiled
    # model when built), else "off"; "on" compiles before taking requests.
    compile: str = "auto"
    device: str = "auto"  # "auto": CUDA when available
    block_size: int = 16
    kv_cache_memory_gib: float | None = None  # CPU KV budget; default 2 GiB
    gpu_memory_utilization: float = 0.9  # CUDA: share of free memory after weights
    num_kv_blocks: int | None = None  # exact pool size, overriding both budgets (tests, tuning)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # The most tokens of one prompt prefilled in a step (vLLM's option; 0: no cap beyond the
    # budget), so that prompts arriving behind a long one start within a step and the
    # streams already flowing keep short steps (engine/scheduler.py). None: 256 on CPU,
    # where a 2,048-token chunk of a long prompt takes seconds, and 0 on CUDA, where it takes
    # milliseconds and more steps would only add their overhead.
    long_prefill_token_threshold: int | None = None
    max_model_len: int | None = None  # default: the model's own context window
    enable_prefix_caching: bool = True
    # Seeds the engine's random numbers, which draw the tokens of requests that set no seed
    # of their own; None (vLLM's) draws them from a seed chosen at random at start.
    seed: int | None = 0
    # CPU intra-op threads for the forward pass; None keeps torch's default (every core).
    # Set on the thread that builds the engine, which must be the one that steps it (OpenMP
    # keeps one worker team per thread that runs parallel ops; see engine/async_llm.py).
    num_threads: int | None = None
    # AsyncLLM pins its engine thread's OpenMP team, one thread per CPU, when the team
    # fills the process's CPUs (engine/thread_pinning.py); False leaves placement to the OS.
    pin_threads: bool = True
    # AsyncLLM: an idle engine that receives a request waits until none has arrived for
    # this long (at most MAX_BURST_WAITS times over) before its first step, so a burst of
    # requests is prefilled in one step rather than its first arrival alone, then the rest
    # (engine/async_llm.py). 0 steps at once.
    burst_wait_ms: float = 5.0
    # vLLM's options, accepted so its scripts run unchanged: one device per engine here;
    # enforce_eager=True means compile="off" (vLLM: no CUDA graphs, here no compile step);
    # trust_remote_code changes nothing, as the loader never runs a checkpoint's code.
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.tensor_parallel_size != 1:
            raise ValueError(
                "tensor_parallel_size must be 1: an engine runs on one device, "
                f"got {self.tensor_parallel_size}"
            )
        if self.enforce_eager and self.compile not in ("auto", "off"):
            raise ValueError(
                "enforce_eager=True runs the model eagerly, which contradicts "
                f"compile={self.compile!r}"
            )
        if self.device != "auto":
            _check_device(self.device)
        self.dtype = _dtype_name(self.dtype)
        if self.quantization is None:
            self.quantization = "auto"
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(
                f"dtype must be 'auto' or one of {sorted([*DTYPES, *DTYPE_ALIASES])}, "
                f"got {self.dtype!r}"
            )
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be 'auto' or one of {sorted(DTYPES)}, "
                f"got {self.kv_cache_dtype!r}"
            )
        if self.quantization not in ("auto", *QUANTIZATIONS):
            raise ValueError(
                f"quantization must be 'auto' or one of {list(QUANTIZATIONS)}, "
                f"got {self.quantization!r}"
            )
        if self.compile not in ("auto", *COMPILE_MODES):
            raise ValueError(
                f"compile must be 'auto' or one of {list(COMPILE_MODES)}, got {self.compile!r}"
            )
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        threshold = self.long_prefill_token_threshold
        if threshold is not None and not (is_int(threshold) and threshold >= 0):
            raise ValueError(
                f"long_prefill_token_threshold must be None or an integer >= 0, got {threshold!r}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be >= 1")
        if not 0 <= self.burst_wait_ms <= 1000:
            raise ValueError(f"burst_wait_ms must be from 0 to 1000, got {self.burst_wait_ms}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.kv_cache_memory_gib is not None and not 0 < self.kv_cache_memory_gib < math.inf:
            raise ValueError(
                f"kv_cache_memory_gib must be a finite number > 0, got {self.kv_cache_memory_gib}"
            )
        if self.seed is not None and not (is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX):
            raise ValueError(
                f"seed must be None or an integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}"
            )

    def resolve_max_model_len(self, model_window: int) -> int:
        """The context window: max_model_len, or the model's own (`model_window`) when none is
        given. One above the model's own is a ValueError, as vLLM refuses it: the positions
        past it were never trained, and a window silently cut would mislead the caller."""
        if self.max_model_len is None:
            return model_window
        if self.max_model_len > model_window:
            raise ValueError(
                f"max_model_len {self.max_model_len} is above the context window of "
                f"{self.model}: {model_window} tokens"
            )
        return self.max_model_len

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    def _fast_cpu_defaults(self, device: torch.device) -> bool:
        """Whether the CPU speed defaults apply: on CPU, with no dtype asked for."""
        return device.type == "cpu" and self.dtype == "auto"

    def resolve_quantization(self, device: torch.device) -> str:
        if self.quantization == "auto":
            return cpu_path().quantization if self._fast_cpu_defaults(device) else "none"
        return self.quantization

    def resolve_compile(self, device: torch.device) -> str:
        if self.enforce_eager:
            return "off"
        if self.compile == "auto":
            return cpu_path().compile if self._fast_cpu_defaults(device) else "off"
        return self.compile

    def resolve_long_prefill_token_threshold(self, device: torch.device) -> int:
        if self.long_prefill_token_threshold is None:
            return CPU_PREFILL_CHUNK if device.type == "cpu" else 0
        return self.long_prefill_token_threshold

    def resolve_kv_cache_dtype(self, device: torch.device) -> torch.dtype:
        if self.kv_cache_dtype == "auto":
            if self._fast_cpu_defaults(device):
                return torch.bfloat16
            return self.resolve_dtype(device)
        return DTYPES[self.kv_cache_dtype]


def _dtype_name(value: object) -> object:
    """`value`'s DTYPES name when it is a vLLM alias or a torch.dtype of DTYPES, else `value`
    as given (for the check that follows to refuse)."""
    if isinstance(value, torch.dtype):
        return next((name for name, dtype in DTYPES.items() if dtype == value), value)
    return DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value


def _check_device(name: str) -> None:
    """ValueError unless `name` is a CPU or a CUDA device this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s)")
