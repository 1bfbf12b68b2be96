"""The fake engine's tokenizer (token id = code point), in a module of its own: the
server's preparation process unpickles it, and importing it there should not import what
the fake engine needs (torch, through the engine's output types)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from engine.errors import ContextLengthExceededError
from engine.tokenizer import Tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A template with a tool section, like Qwen's: it lists the tools it is given.
CHATML_WITH_TOOLS = (
    "{% if tools %}<tools>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}"
    "</tools>\n{% endif %}" + CHATML
)


class FakeTokenizer:
    all_special_tokens = ("<|im_start|>", "<|im_end|>")

    def __init__(self, chat_template: str = CHATML) -> None:
        self.chat_template = chat_template
        self.last_prompt: str | None = None
        self.last_tools: list[dict] | None = None

    def encode(
        self, text: str, add_special_tokens: bool = False, max_tokens: int | None = None
    ) -> list[int]:
        if max_tokens is not None and len(text) > max_tokens:
            raise ContextLengthExceededError(f"the prompt has {len(text)} tokens")
        return [ord(c) for c in text]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(t) for t in token_ids)

    def token_bytes(self, token_id: int) -> bytes:
        return chr(token_id).encode(errors="surrogatepass")

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        *,
        tokenize: bool = True,
        **options: Any,
    ) -> str | list[int]:
        """Rendered by the engine's own tokenizer code (continue_final_message, template
        variables), over a vocabulary the text never reaches."""
        backend = HFTokenizer(models.WordLevel({"?": 0}, unk_token="?"))
        renderer = Tokenizer(backend, chat_template=self.chat_template)
        self.last_prompt = renderer.apply_chat_template(
            messages, add_generation_prompt, tools, tokenize=False, **options
        )
        self.last_tools = tools
        return self.encode_chat_text(self.last_prompt) if tokenize else self.last_prompt

    def encode_chat_text(self, text: str, *, max_tokens: int | None = None) -> list[int]:
        return self.encode(text, max_tokens=max_tokens)

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        *,
        max_tokens: int | None = None,
        **options: Any,
    ) -> list[int]:
        text = self.apply_chat_template(
            messages, add_generation_prompt, tools, tokenize=False, **options
        )
        return self.encode_chat_text(text, max_tokens=max_tokens)
