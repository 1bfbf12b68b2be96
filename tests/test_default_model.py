"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) end to end: greedy tokens equal
transformers' greedy generation from its own load of the same GGUF file; stop strings."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
import transformers

from engine import LLM, SamplingParams
from engine.loader import resolve_model

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primary colors."},
    ],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m-instruct", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def hf_model():
    path = resolve_model("smollm2-135m-instruct").path
    folder, name = os.path.split(path)
    # transformers maps GGUF tensor names to its own by walking the model's ~400 modules and
    # building gguf's name table (every layer's every name) anew at each: a third of the
    # load's CPU time. The table depends only on the architecture and the layer count, so
    # one built once is the same table, and the load reads the same weights.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, torch_dtype=torch.float32
        )
    return model


def test_greedy_chat_matches_transformers(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    outs = llm.chat(CHATS, params)
    for chat, out in zip(CHATS, outs, strict=True):
        ids = torch.tensor([llm.tokenizer.encode_chat(chat)])
        assert out.prompt_token_ids == ids[0].tolist()
        ref = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=sorted(llm.tokenizer.stop_token_ids),
        )[0, ids.shape[1] :].tolist()
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].text == llm.tokenizer.decode(ref, skip_special_tokens=True)
    assert "Paris" in outs[0].outputs[0].text


def test_stop_string_is_never_emitted(llm):
    chat = CHATS[0]
    full = llm.chat(chat, SamplingParams(temperature=0, max_tokens=MAX_NEW))[0].outputs[0].text
    word = "Paris"
    assert word in full
    out = llm.chat(chat, SamplingParams(temperature=0, max_tokens=MAX_NEW, stop=[word]))[0]
    assert out.outputs[0].text == full[: full.index(word)]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == word
    kept = llm.chat(
        chat,
        SamplingParams(
            temperature=0, max_tokens=MAX_NEW, stop=[word], include_stop_str_in_output=True
        ),
    )[0]
    assert kept.outputs[0].text == full[: full.index(word) + len(word)]


def test_a_script_exiting_during_the_background_compile_exits_cleanly():
    """The default engine compiles on a thread of its own; a short script ends before it
    does. A compile thread inside torch's C++ code at interpreter exit aborted the process
    ("terminate called without an active exception"; on main before the fix, in about half
    of the runs on a busy 2-core machine, depending on where the compile was)."""
    script = (
        "from engine import LLM, SamplingParams; LLM('smollm2-135m-instruct').generate("
        "'Hello', SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_default_offline_engine_answers_a_prompt_alike_on_every_call():
    """With the CPU's default modes the compile step runs in the background; `LLM` returns
    once it has ended, so no call runs on another backend than the next (a switch changes
    rounding, and flipped this prompt's greedy answer between two runs)."""
    fast = LLM("smollm2-135m-instruct")
    compile_step = fast.engine.background_compile
    assert compile_step is None or compile_step.state in ("ready", "failed")
    params = SamplingParams(max_tokens=6, temperature=0)
    answers = {
        fast.generate("The capital of France is", params, use_tqdm=False)[0].outputs[0].text
        for _ in range(3)
    }
    assert len(answers) == 1
