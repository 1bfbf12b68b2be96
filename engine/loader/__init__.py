"""Load a model's config, weights and tokenizer from a built-in name, a GGUF or a HF folder.

Both formats end in the same place: Hugging Face parameter names, tensors already in the
engine's dtype, and one `ModelConfig`, so the model code has a single load path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from engine.config import ModelConfig, UnsupportedModelError
from engine.loader.gguf import config_from_gguf, gguf_weight_loaders, read_gguf
from engine.loader.resolve import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    ModelNotFoundError,
    ResolvedModel,
    resolve_model,
)
from engine.loader.safetensors import read_hf_config, safetensors_weight_loaders, shard_files
from engine.tokenizer import Tokenizer

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelNotFoundError",
    "ResolvedModel",
    "UnsupportedModelError",
    "expected_weight_names",
    "load_config",
    "load_model",
    "resolve_model",
]

# Parameters HF checkpoints may carry that the engine recomputes itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # HF parameter names -> tensors in the requested dtype
    tokenizer: Tokenizer | None  # None only for a HF folder without tokenizer files
    source: str  # resolved file or folder path, for logs


def load_model(model: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Resolve `model` and load it; see `resolve_model` for what `model` may be."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    resolved = resolve_model(model)
    if resolved.kind == "gguf":
        return _load_gguf(resolved.path, dtype)
    return _load_hf(Path(resolved.path), dtype)


def load_config(model: str) -> ModelConfig:
    """Resolve `model` and read its config alone (the GGUF header or config.json, no weight):
    what is needed to check options against the model before a load of seconds to minutes."""
    resolved = resolve_model(model)
    if resolved.kind == "gguf":
        return config_from_gguf(read_gguf(resolved.path))
    return read_hf_config(Path(resolved.path))


def _load_gguf(path: str, dtype: torch.dtype) -> LoadedModel:
    gf = read_gguf(path)
    config = config_from_gguf(gf)
    tokenizer = Tokenizer.from_gguf(gf.metadata) if "tokenizer.ggml.tokens" in gf.metadata else None
    weights = _run(gguf_weight_loaders(gf, config, dtype), path)
    return LoadedModel(config, _checked(weights, config, path), tokenizer, path)


def _load_hf(folder: Path, dtype: torch.dtype) -> LoadedModel:
    config = read_hf_config(folder)
    shards = shard_files(folder)
    has_tokenizer = any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = Tokenizer.from_hf_folder(folder) if has_tokenizer else None
    weights = _run(safetensors_weight_loaders(shards, dtype), str(folder))
    return LoadedModel(config, _checked(weights, config, str(folder)), tokenizer, str(folder))


# Tensors load on a small thread pool (torch releases the GIL), each op single-threaded:
# dequantizing is memory-bound elementwise work that intra-op threads barely speed up,
# while their spin-waiting collapses when cores are shared (measured on a busy 2-core
# box: 1.3 s single-threaded vs 12 s with two intra-op threads).
_WORKERS = min(8, os.cpu_count() or 1)


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _run(
    loaders: list[tuple[str, Callable[[], torch.Tensor]]], source: str
) -> dict[str, torch.Tensor]:
    names = [name for name, _ in loaders]
    with _intra_op_threads(1), ThreadPoolExecutor(_WORKERS) as pool:
        tensors = pool.map(lambda item: item[1](), loaders)
        # delay=1: the bar only appears for loads that take over a second.
        bar = tqdm(
            tensors,
            total=len(loaders),
            desc=f"Loading {Path(source).name}",
            unit="tensor",
            delay=1.0,
            leave=False,
        )
        return {
            name: t
            for name, t in zip(names, bar, strict=True)
            if not name.endswith(_IGNORED_SUFFIXES)
        }


def expected_weight_names(config: ModelConfig) -> set[str]:
    """Every parameter the engine's model reads for `config`."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        names.add("lm_head.weight")
    per_layer = [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]
    if config.attention_bias:
        per_layer += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    if config.qk_norm:
        per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    for i in range(config.num_hidden_layers):
        names.update(f"model.layers.{i}.{p}" for p in per_layer)
    return names


def _checked(
    weights: dict[str, torch.Tensor], config: ModelConfig, source: str
) -> dict[str, torch.Tensor]:
    """Fail at load time, naming the tensors, rather than deep inside the model."""
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    missing = expected_weight_names(config) - weights.keys()
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
        raise UnsupportedModelError(
            f"{source} is missing {len(missing)} weight(s) the {config.architecture} model "
            f"needs: {shown}"
        )
    return weights
