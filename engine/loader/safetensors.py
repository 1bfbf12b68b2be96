"""Hugging Face folders: `config.json` and (possibly sharded) `*.safetensors` weights.

`safe_open` memory-maps each shard, so a tensor costs one copy (the cast to the engine's
dtype) and the shards never sit in memory twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ModelConfig, UnsupportedModelError
from engine.loader.resolve import ModelNotFoundError

_INDEX = "model.safetensors.index.json"
_FLOAT_DTYPES = ("F32", "F16", "BF16")


def read_hf_config(folder: Path) -> ModelConfig:
    with open(folder / "config.json", encoding="utf-8") as f:
        return ModelConfig.from_hf_config(json.load(f))


def shard_files(folder: Path) -> list[Path]:
    """The shards to read: those the index names, else every `*.safetensors` in the folder."""
    index = folder / _INDEX
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelNotFoundError(
                f"{folder}: {_INDEX} lists shards that are not there: {', '.join(missing)}; "
                "the download is incomplete, fetch the missing files"
            )
        return [folder / n for n in names]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        other = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        hint = (
            (
                f" It has PyTorch pickles ({', '.join(sorted(other))}); re-save them with "
                "`model.save_pretrained(folder, safe_serialization=True)`."
            )
            if other
            else ""
        )
        raise ModelNotFoundError(f"{folder} has config.json but no *.safetensors weights.{hint}")
    return shards


def safetensors_weight_loaders(
    shards: list[Path], dtype: torch.dtype
) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """`(name, load)` pairs; each `load()` reads one tensor from its memory-mapped shard and
    casts it to `dtype`. Non-float checkpoints are refused up front, before any copy."""
    loaders = []
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 -- safe_open is not a mapping
                kind = f.get_slice(name).get_dtype()
                if kind not in _FLOAT_DTYPES:
                    raise UnsupportedModelError(
                        f"{shard.name}: tensor {name} is {kind}; tokenmill loads "
                        "F32/F16/BF16 safetensors. For quantized weights use a GGUF file instead."
                    )
                loaders.append((name, partial(_load_tensor, shard, name, dtype)))
    return loaders


def _load_tensor(shard: Path, name: str, dtype: torch.dtype) -> torch.Tensor:
    # Opening is cheap (the header is cached by the OS, the data is mmap-ed), and a handle
    # per call keeps the loaders independent of each other for the thread pool.
    with safe_open(shard, framework="pt") as f:
        return f.get_tensor(name).to(dtype)
