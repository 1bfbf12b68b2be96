"""Offline batch API, shaped like vLLM's `LLM` so scripts can switch engines."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from engine.args import EngineArgs
from engine.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput, merge_output
from engine.sampling_params import SamplingParams
from engine.tokenizer import chat_template_options, template_arguments

# Text, token ids, or vLLM's prompt dicts: TextPrompt {"prompt": ...} and TokensPrompt
# {"prompt_token_ids": ...}.
Prompt = str | list[int] | dict


class LLM:
    """`LLM(model=..., **engine_options)`; see `EngineArgs` for the options."""

    def __init__(self, model: str = EngineArgs.model, **engine_options) -> None:
        """With the default `compile="auto"`, returns once a background compile step has
        ended (a cached build takes about a second; a failed one leaves the engine eager,
        and says so in the log): every call then runs on one backend. Switching between
        calls would change rounding, and so could flip a close greedy choice between two
        runs of one prompt. An explicit `compile="background"` steps on meanwhile."""
        args = EngineArgs(model=model, **engine_options)
        self.engine = LLMEngine(args)
        if args.compile == "auto" and self.engine.background_compile is not None:
            self.engine.background_compile.wait()
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        """vLLM's accessor for `tokenizer`."""
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; results come back in the input order."""
        one = isinstance(prompts, str | dict) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        )
        if not (one or isinstance(prompts, Sequence)):
            raise ValueError(
                "prompts must be a prompt (text, token ids or a prompt dict) or a list of them, "
                f"got {type(prompts).__name__}"
            )
        prompts = [_as_prompt(p) for p in ([prompts] if one else prompts)]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        wrong = next((p for p in params_list if not isinstance(p, SamplingParams)), None)
        if wrong is not None:  # a dict of options, say, would fail deep in the engine
            raise TypeError(f"sampling_params must be SamplingParams, got {type(wrong).__name__}")
        ids = []
        try:
            for prompt, p in zip(prompts, params_list, strict=True):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, p)
                ids.append(request_id)
        except BaseException:
            self._abort(ids)  # a prompt refused: the ones before it must not run later
            raise
        return self._run(ids, use_tqdm)

    def beam_search(
        self,
        prompts: Sequence[Prompt],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """vLLM's beam search (engine/beam_search.py): for each prompt (text, token ids or
        a prompt dict), its best `params.beam_width` sequences, best first."""
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be BeamSearchParams, got {type(params).__name__}")
        if isinstance(prompts, str | dict) or not isinstance(prompts, Sequence):
            raise ValueError("prompts must be a list of prompts (text, token ids or dicts)")
        token_ids = [self.engine.tokenize(_as_prompt(p)) for p in prompts]
        return beam_search(
            lambda batch, step: self.generate(batch, step, use_tqdm=False),
            token_ids,
            params,
            self.engine.outputs.eos_token_ids,
            self.engine.max_model_len,
            None if self.tokenizer is None else self.tokenizer.decode,
            use_tqdm,
        )

    def chat(
        self,
        conversations: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate; each
        output's `prompt` is the rendered text.

        As vLLM's: `continue_final_message` (with `add_generation_prompt=False`) goes on
        with the last message instead of opening a turn, and `chat_template_kwargs` are
        template variables (`{"enable_thinking": False}`) that override the named options.
        """
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        options = chat_template_options(
            add_generation_prompt, continue_final_message, tools, chat_template_kwargs
        )
        texts = [
            self.tokenizer.apply_chat_template(_template_messages(c), tokenize=False, **options)
            for c in conversations
        ]
        prompts = [self.tokenizer.encode_chat_text(text) for text in texts]
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        for output, text in zip(outputs, texts, strict=True):
            output.prompt = text
        return outputs

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        partial: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", disable=not use_tqdm or len(ids) < 2) as bar:
            try:
                while self.engine.has_unfinished_requests():
                    for delta in self.engine.step():
                        if delta.error is not None:
                            raise delta.error
                        merged = merge_output(partial.get(delta.request_id), delta)
                        partial[delta.request_id] = merged
                        if delta.finished:
                            done[delta.request_id] = partial.pop(delta.request_id)
                            bar.update(1)
            except BaseException:
                self._abort(ids)
                raise
        return [done[i] for i in ids]

    def _abort(self, ids: list[str]) -> None:
        """A failed call leaves no request behind to run on in the next one."""
        for request_id in ids:
            self.engine.abort_request(request_id)


def _as_prompt(prompt) -> str | list[int]:
    """A prompt as the engine takes it: text or token ids, from vLLM's dicts too. A dict's
    other keys (vLLM's multi_modal_data, cache_salt...) are refused: dropping them would
    answer a different request than the one asked."""
    if isinstance(prompt, dict):
        if not prompt.keys() & {"prompt", "prompt_token_ids"}:
            raise ValueError("a prompt dict needs 'prompt' (text) or 'prompt_token_ids'")
        unknown = sorted(str(k) for k in prompt.keys() - {"prompt", "prompt_token_ids"})
        if unknown:
            raise ValueError(
                f"a prompt dict takes only 'prompt' and 'prompt_token_ids', got {unknown}"
                + (" (use SamplingParams.cache_salt)" if "cache_salt" in unknown else "")
            )
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, list | tuple):
                raise ValueError(f"'prompt_token_ids' must be a list of token ids, got {ids!r}")
            return list(ids)
        if not isinstance(prompt["prompt"], str):
            raise ValueError(f"'prompt' must be text, got {prompt['prompt']!r}")
        return prompt["prompt"]
    if isinstance(prompt, str | list):
        return prompt
    raise ValueError(
        f"a prompt must be text, a list of token ids or a prompt dict, got {type(prompt).__name__}"
    )


def _template_messages(messages: list[dict]) -> list[dict]:
    """Messages with their content as the chat templates read it, a string: OpenAI's text
    parts joined by newlines, an assistant's missing content (a turn of tool calls) empty;
    and tool calls' JSON arguments as dicts (`_template_call`).
    Any other shape is a ValueError naming the message, not an error from inside the
    template."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role'")
        content = message.get("content")
        if content is None:
            if not message.get("tool_calls"):
                raise ValueError(f"messages[{i}] has no 'content'")
            content = ""
        elif isinstance(content, list):
            texts = [
                p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None
                for p in content
            ]
            if not all(isinstance(t, str) for t in texts):
                raise ValueError(f"messages[{i}].content: only text parts are supported")
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        out.append({**message, "content": content})
        if message.get("tool_calls"):
            out[-1]["tool_calls"] = [_template_call(call) for call in message["tool_calls"]]
    return out


def _template_call(call: object) -> object:
    """An OpenAI tool call with its `arguments` as the templates read them
    (`template_arguments`), as the server renders them too."""
    function = call.get("function") if isinstance(call, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    if not isinstance(arguments, str):
        return call
    return {**call, "function": {**function, "arguments": template_arguments(arguments)}}
