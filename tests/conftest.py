"""Shared fixtures: tiny random Hugging Face models saved to disk, the test device, and a
throwaway PostgreSQL server (the store's and the retrieval index's tests)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator

import pytest
import torch

from tests.product.postgres import PostgresServer, start_postgres

TEST_DEVICE = torch.device(os.environ.get("TOKENMILL_TEST_DEVICE", "cpu"))

TINY = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def _tiny_config(arch: str):
    import transformers

    if arch == "llama":
        return transformers.LlamaConfig(**TINY, rope_theta=10000.0, tie_word_embeddings=True)
    if arch == "llama3":
        return transformers.LlamaConfig(
            **TINY,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if arch == "qwen2":
        return transformers.Qwen2Config(**TINY, tie_word_embeddings=False)
    if arch == "qwen3":
        return transformers.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=True)
    raise ValueError(arch)


TINY_ARCHS = ["llama", "llama3", "qwen2", "qwen3"]


def save_random_model(cfg, path, std: float = 0.15):
    """A random model of `cfg`, saved as safetensors under `path` and returned. transformers' init
    (std 0.02) makes every logit nearly equal; `std` widens it so that greedy decoding has
    clear winners and comparisons mean something."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, std)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: arch -> path of a saved tiny random model (cached per session)."""

    cache: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in cache:
            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            save_random_model(_tiny_config(arch), path)
            cache[arch] = str(path)
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    """A tiny random Llama with the default model's tokenizer (49,152 tokens) and chat
    template: real tokens and text, at the speed of a random model."""
    import transformers

    from engine.loader import resolve_model
    from engine.loader.gguf import read_gguf
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(read_gguf(resolve_model("smollm2-135m-instruct").path).metadata)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        **{**TINY, "vocab_size": tokenizer.backend.get_vocab_size()},
        rope_theta=10000.0,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-chat")
    save_random_model(cfg, path)
    (path / "tokenizer.json").write_text(tokenizer.backend.to_str(), encoding="utf-8")
    config = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "chat_template": tokenizer.chat_template,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = start_postgres()
    yield server
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)


def record_event_loop_calls(monkeypatch, owner: type, name: str) -> list[bool]:
    """Wrap `owner.name`: each call appends whether it ran on an event loop's thread (True)
    or off it, in a worker thread (False)."""
    on_loop: list[bool] = []
    original = getattr(owner, name)

    def recording(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return on_loop
