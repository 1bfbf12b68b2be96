"""Hugging Face folders: `config.json` and (possibly sharded) `*.safetensors` weights.

`safe_open` memory-maps each shard, so a tensor costs one copy (the cast to the engine's
dtype) and the shards never sit in memory twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ModelConfig, UnsupportedModelError
from engine.loader.resolve import ModelNotFoundError

_INDEX = "model.safetensors.index.json"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def read_hf_config(folder: Path) -> ModelConfig:
    with open(folder / "config.json", encoding="utf-8") as f:
        raw = json.load(f)
    # Multimodal wrappers nest the language model's fields; we only run the text model.
    return ModelConfig.from_hf_config(raw.get("text_config") or raw)


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
        hint = (f" It has PyTorch pickles ({', '.join(sorted(other))}); re-save them with "
                "`model.save_pretrained(folder, safe_serialization=True)`.") if other else ""
        raise ModelNotFoundError(f"{folder} has config.json but no *.safetensors weights.{hint}")
    return shards


def count_tensors(shards: list[Path]) -> int:
    total = 0
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            total += len(f.keys())
    return total


def iter_safetensors_weights(shards: list[Path],
                             dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` cast to `dtype`; non-float checkpoints are refused."""
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 -- safe_open is not a mapping
                tensor = f.get_tensor(name)
                if tensor.dtype not in _FLOAT_DTYPES:
                    raise UnsupportedModelError(
                        f"{shard.name}: tensor {name} is {tensor.dtype}; tokenmill loads "
                        "float32/float16/bfloat16 safetensors. For quantized weights use a "
                        "GGUF file instead."
                    )
                yield name, tensor.to(dtype)
