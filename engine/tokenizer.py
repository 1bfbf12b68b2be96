"""Tokenizer: encode/decode with `tokenizers`, chat templates with sandboxed jinja2.

Built either from a Hugging Face folder (`tokenizer.json` + `tokenizer_config.json`) or
from a GGUF's `tokenizer.ggml.*` metadata, which holds the vocabulary and merges but not
the pre-tokenizer: that is chosen from `tokenizer.ggml.pre`, the name llama.cpp gives to
the split regex the merges were learned with.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from engine.config import UnsupportedModelError
from engine.errors import ContextLengthExceededError

# A text longer than this many characters per token it may have is first tokenized up
# to that length only: most text averages 3 to 5 characters a token, so a text too
# long to fit is usually refused after tokenizing that much of it.
PREFIX_CHARS_PER_TOKEN = 4

# End-of-turn markers of the chat formats we serve; any present in the vocabulary stops
# generation, since instruct models often end a turn with one that is not their EOS.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
)

# Split regexes (before byte-level mapping) by `tokenizer.ggml.pre`; names not listed use
# GPT-2's regex, which is what ByteLevel applies by itself.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"}
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen"}
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # llama.cpp token types
ZERO_WIDTH_SPACE = "\u200b"


def break_special_tokens(text: str, special_tokens: Iterable[str]) -> str:
    """`text` with every special token it spells broken up by a zero-width space after
    the token's first character: it reads the same, but it is tokenized as plain text,
    where a rendered chat (whose special tokens the template writes as text) would
    otherwise read a role marker or an end of turn in it."""
    pattern = _spelled(tuple(special_tokens))
    if pattern is None:
        return text
    return pattern.sub(lambda m: m.group(0)[0] + ZERO_WIDTH_SPACE + m.group(0)[1:], text)


def template_arguments(arguments: str) -> object:
    """A tool call's `arguments` as chat templates read them (as transformers and vLLM
    give them): the dict its JSON text holds (blank text: none, {}), for a template's
    `tojson` would write a JSON string twice encoded; text that is not JSON, or nested past
    what the decoder's recursion allows (a client's history may hold it), as written."""
    if not arguments.strip():
        return {}
    try:
        return json.loads(arguments)
    except (json.JSONDecodeError, RecursionError):
        return arguments


@lru_cache(maxsize=8)
def _spelled(special_tokens: tuple[str, ...]) -> re.Pattern[str] | None:
    """One pattern for all of a vocabulary's special tokens (Llama 3 has 256), longest
    first, so a chat's every string is scanned once rather than once per token."""
    tokens = sorted({t for t in special_tokens if len(t) > 1}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


class Tokenizer:
    """A fast tokenizer plus the model's special tokens and chat template."""

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
        extra_stop_ids: Sequence[int] = (),
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = self._id_or_none(bos_token)
        self.eos_token_id = self._id_or_none(eos_token)
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        # Extra template variables (unk_token, pad_token...) transformers also exposes.
        self.special_tokens = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            **(special_tokens or {}),
        }
        stops = {self.eos_token_id, *extra_stop_ids}
        stops.update(self._id_or_none(t) for t in END_OF_TURN_TOKENS)
        self.stop_token_ids: set[int] = {i for i in stops if i is not None}
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.all_special_ids: set[int] = {
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        }

    @cached_property
    def all_special_tokens(self) -> tuple[str, ...]:
        """The special tokens' text (`<|im_start|>`, `<file_sep>`...): untrusted text that
        holds one must have it broken up (orchestrator/untrusted.py), or it becomes that
        token once tokenized."""
        added = self.backend.get_added_tokens_decoder()
        return tuple(sorted(tok.content for i, tok in added.items() if i in self.all_special_ids))

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """From `tokenizer.json`, with special tokens and template from the JSON configs."""
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise UnsupportedModelError(
                f"{folder} has no tokenizer.json; tokenmill needs a fast tokenizer. Create it "
                "with `AutoTokenizer.from_pretrained(folder).save_pretrained(folder)`"
            )
        backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        cfg = _read_json(folder / "tokenizer_config.json")
        specials = {k: _token_text(cfg.get(k)) for k in ("unk_token", "pad_token")}
        extra_stops = [
            *_ids(_read_json(folder / "generation_config.json").get("eos_token_id")),
            *_ids(_read_json(folder / "config.json").get("eos_token_id")),
        ]
        return cls(
            backend,
            bos_token=_token_text(cfg.get("bos_token")),
            eos_token=_token_text(cfg.get("eos_token")),
            chat_template=_folder_chat_template(folder, cfg),
            add_bos_token=bool(cfg.get("add_bos_token", False)),
            extra_stop_ids=extra_stops,
            special_tokens={k: v for k, v in specials.items() if v is not None},
        )

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any]) -> Tokenizer:
        """From GGUF metadata: byte-level BPE (`tokenizer.ggml.model` "gpt2": Llama 3, Qwen,
        SmolLM) or SentencePiece BPE ("llama": Llama 2, Mistral, TinyLlama)."""
        model = metadata.get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise UnsupportedModelError(
                f"GGUF tokenizer model {model!r} is not supported; tokenmill reads byte-level "
                "BPE ('gpt2': Llama 3, Qwen, SmolLM) and SentencePiece BPE ('llama'). Use the "
                "model's Hugging Face folder (with tokenizer.json) instead"
            )
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]
        types: list[int] = metadata.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        if model == "gpt2":
            backend = _byte_level_backend(metadata, tokens, types)
            add_bos_default = False
        else:
            backend = _sentencepiece_backend(metadata, tokens, types)
            add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
        backend.add_special_tokens(
            [
                AddedToken(t, special=True, normalized=False)
                for t, kind in zip(tokens, types, strict=True)
                if kind == _CONTROL
            ]
        )
        backend.add_tokens(
            [
                AddedToken(t, special=False, normalized=False)
                for t, kind in zip(tokens, types, strict=True)
                if kind == _USER_DEFINED
            ]
        )

        def token(key: str) -> str | None:
            idx = metadata.get(f"tokenizer.ggml.{key}")
            return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

        bos = token("bos_token_id")
        add_bos = metadata.get("tokenizer.ggml.add_bos_token", add_bos_default) and bos is not None
        if add_bos:
            bos_id = metadata["tokenizer.ggml.bos_token_id"]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, bos_id)],
            )
        specials = {"unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
        return cls(
            backend,
            bos_token=bos,
            eos_token=token("eos_token_id"),
            chat_template=metadata.get("tokenizer.chat_template"),
            add_bos_token=bool(add_bos),
            extra_stop_ids=[
                metadata[k]
                for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                if k in metadata
            ],
            special_tokens={k: v for k, v in specials.items() if v is not None},
        )

    # -- encode / decode -------------------------------------------------------------------

    def encode(
        self, text: str, add_special_tokens: bool = False, max_tokens: int | None = None
    ) -> list[int]:
        """The text's token ids; with `max_tokens`, `ContextLengthExceededError` for a text
        of more tokens, raised without tokenizing the rest when its head alone has more."""
        if max_tokens is not None and len(text) > PREFIX_CHARS_PER_TOKEN * max_tokens:
            self._refuse_if_head_exceeds(text, max_tokens)
        ids = self._encode(text, add_special_tokens)
        if max_tokens is not None and len(ids) > max_tokens:
            raise ContextLengthExceededError(
                f"the prompt has {len(ids)} tokens, more than {max_tokens}"
            )
        return ids

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode holds it: 1.4 s for 800k
        # characters), so a server tokenizing on a worker thread keeps serving meanwhile.
        (encoding,) = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)
        return encoding.ids

    def _refuse_if_head_exceeds(self, text: str, max_tokens: int) -> None:
        """Tokenizing 130,000 characters takes ~30 ms of a core; a client can send such
        prompts back to back. The head is cut where a word ends before whitespace, where
        the pre-tokenizer splits too, so its tokens are the text's first tokens and their
        count is a lower bound on the whole text's."""
        head = text[: PREFIX_CHARS_PER_TOKEN * max_tokens]
        end = max(head.rfind(c) for c in " \n\t")
        head = head[:end].rstrip() if end > 0 else ""
        if not head:
            return
        count = len(self._encode(head, add_special_tokens=False))
        if count > max_tokens:
            raise ContextLengthExceededError(
                f"the prompt has more than {max_tokens} tokens (its first {len(head)} of "
                f"{len(text)} characters alone make {count})"
            )

    def __len__(self) -> int:
        """The vocabulary's size, added tokens included, as transformers' `len(tokenizer)`."""
        return self.vocab_size

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The ids' text; special tokens are kept unless skipped, as transformers' default
        is (tokenmill's own callers each say which they want)."""
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (OpenAI's logprob `bytes`). A token may hold part of
        a character, which decoding it alone turns into U+FFFD; its bytes are exact."""
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added_ids:
            return piece.encode()
        if self._byte_of is not None:  # byte-level BPE: one alphabet character per byte
            raw = [self._byte_of.get(char) for char in piece]
            return bytes(raw) if None not in raw else piece.encode()  # type: ignore[arg-type]
        fallback = _BYTE_PIECE.fullmatch(piece)  # SentencePiece's byte fallback, <0xE2>
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    @cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self.backend.get_added_tokens_decoder())

    @cached_property
    def _byte_of(self) -> dict[str, int] | None:
        """GPT-2's alphabet back to bytes, for a byte-level vocabulary (else None)."""
        if not isinstance(self.backend.decoder, decoders.ByteLevel):
            return None
        return {char: byte for byte, char in _byte_alphabet().items()}

    # -- chat ------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        *,
        tokenize: bool = True,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render the conversation the way transformers' `apply_chat_template` does,
        except that the special tokens the messages, tools and variables spell are
        broken up (`break_special_tokens`): only those the template writes itself are
        special once the text is tokenized, so no content can open a turn of its own.

        As in transformers, `tokenize` (the default) returns the text's token ids
        (`encode_chat_text`), and `tokenize=False` the text itself.
        `continue_final_message` ends the text at the last message's content (as
        transformers does), so the model goes on with that message rather than a new one.
        """
        check_turn_options(add_generation_prompt, continue_final_message)
        if self._template is None:
            raise ValueError(
                "this model has no chat template (none in tokenizer_config.json, "
                "chat_template.jinja or the GGUF's tokenizer.chat_template); "
                "use the completions endpoint or a model with a template"
            )
        messages, tools, template_kwargs = self._as_text((messages, tools, template_kwargs))
        variables = {**self.special_tokens, **template_kwargs}
        text = self._template.render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
        if continue_final_message:
            text = _end_at_final_message(text, messages)
        return self.encode_chat_text(text) if tokenize else text

    def _as_text(self, value: Any) -> Any:
        """`value` with the special tokens of its every string (keys too) broken up."""
        if isinstance(value, str):
            return break_special_tokens(value, self.all_special_tokens)
        if isinstance(value, dict):
            return {self._as_text(k): self._as_text(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._as_text(v) for v in value)
        return value

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        *,
        max_tokens: int | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """Render (`apply_chat_template`) then encode (`encode_chat_text`)."""
        text = self.apply_chat_template(
            messages, add_generation_prompt, tools, tokenize=False, **template_kwargs
        )
        return self.encode_chat_text(text, max_tokens=max_tokens)

    def encode_chat_text(self, text: str, *, max_tokens: int | None = None) -> list[int]:
        """Encode a rendered chat (`max_tokens` as for `encode`); the template writes its
        own special tokens as text.

        Encoding without the post-processor avoids a second BOS when the template already
        starts with one; a BOS is added only when the model wants one and the template
        did not write it (llama.cpp's rule).
        """
        ids = self.encode(text, add_special_tokens=False, max_tokens=max_tokens)
        if self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def __getstate__(self) -> dict[str, Any]:
        """Without the compiled template (jinja's are not picklable); it compiles again
        on first use. The server sends its tokenizer to its preparation process."""
        state = dict(self.__dict__)
        state.pop("_template", None)
        return state

    @cached_property
    def _template(self) -> jinja2.Template | None:
        if self.chat_template is None:
            return None
        return _chat_environment().from_string(self.chat_template)


# ---------------------------------------------------------------------------------------------


def truncate_prompt(token_ids: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """The prompt's last `keep` tokens (`truncate_prompt_tokens`; -1: the context window's
    worth), as vLLM keeps them; the whole prompt when `keep` is None."""
    if keep is None:
        return token_ids
    return token_ids[-(max_model_len if keep == -1 else keep) :]


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    split = _LLAMA3_SPLIT if pre in _LLAMA3_PRE else _QWEN2_SPLIT if pre in _QWEN2_PRE else None
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _byte_level_backend(
    metadata: dict[str, Any], tokens: list[str], types: list[int]
) -> HFTokenizer:
    alphabet = _byte_alphabet()
    allowed = set(alphabet.values())
    # Normal tokens are stored in GPT-2's byte alphabet; a few converters store some as
    # raw text, which the BPE model could then never produce: respell those.
    vocab = {
        t
        if kind != _NORMAL or set(t) <= allowed
        else "".join(alphabet[b] for b in t.encode("utf-8")): i
        for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
    }
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    pre = metadata.get("tokenizer.ggml.pre", "default")
    backend = HFTokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            fuse_unk=False,
            # Llama 3 looks whole words up in the vocabulary before merging.
            ignore_merges=pre in _LLAMA3_PRE,
        )
    )
    backend.pre_tokenizer = _gguf_pre_tokenizer(pre)
    if pre in _QWEN2_PRE:
        backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(
    metadata: dict[str, Any], tokens: list[str], types: list[int]
) -> HFTokenizer:
    """SentencePiece BPE: "▁" for spaces, <0xNN> byte tokens for anything out of vocabulary."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    if not merges:
        merges = _merges_from_scores(tokens, types, metadata.get("tokenizer.ggml.scores"))
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    backend = HFTokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            fuse_unk=True,
            byte_fallback=True,
            unk_token=tokens[unk_id] if unk_id is not None else None,
        )
    )
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(
    tokens: list[str], types: list[int], scores: list[float] | None
) -> list[tuple[str, str]]:
    """SentencePiece GGUFs store piece scores, not merges. A piece is made by merging any two
    pieces that spell it, and higher-scoring pieces merge first, so every such split becomes a
    merge ranked by the merged piece's score."""
    if scores is None:
        raise UnsupportedModelError("SentencePiece GGUF has neither merges nor scores")
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, kind, score in zip(tokens, types, scores, strict=True):
        if kind not in (_NORMAL, _USER_DEFINED):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-score, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for
    themselves, the rest are shifted to code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return table


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(value: Any) -> str | None:
    """tokenizer_config writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


class ChatTemplateOptionError(ValueError):
    """A chat-template option set wrongly; `param` names what the caller passed it as (the
    option's own name, or `chat_template_kwargs` for a template variable), for the
    server's 400 and for the message."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_turn_options(
    add_generation_prompt: bool,
    continue_final_message: bool,
    names: tuple[str, str] = ("add_generation_prompt", "continue_final_message"),
) -> None:
    """The one rule on how the rendered chat ends: continuing the last message and opening
    a new assistant turn exclude each other. `names` are what the caller passed the two
    as; the error's `param` is a template variable's source if one set them, else the
    continue option (the one that asks for something other than the default)."""
    if not (add_generation_prompt and continue_final_message):
        return
    add, extend = names
    dotted = [name for name in (extend, add) if "." in name]
    raise ChatTemplateOptionError(
        f"{extend} and {add} cannot both be true: the first continues the last message, "
        "the second opens a new assistant turn",
        _field(dotted[0] if dotted else extend),
    )


def _field(name: str) -> str:
    """The argument an option's `name` was passed in: `chat_template_kwargs.x` was in
    chat_template_kwargs, a bare name was its own."""
    return name.split(".")[0]


def chat_template_options(
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[dict] | None = None,
    chat_template_kwargs: dict | None = None,
) -> dict[str, Any]:
    """The keyword arguments of `Tokenizer.apply_chat_template` for vLLM's chat options
    (`LLM.chat`, the chat completions route): `chat_template_kwargs` are template
    variables (`{"enable_thinking": False}`) that override the named options, as vLLM
    merges them; the caller passes `tokenize=False` itself. A ChatTemplateOptionError (a
    ValueError) names chat_template_kwargs when it is not a dict keyed by names or sets
    the messages, `self` or `tokenize`; and names where
    each option came from when one is anything but a boolean (a template tests them for
    truth, so "no" would open a turn) or both are true."""
    if chat_template_kwargs is None:
        chat_template_kwargs = {}
    if not isinstance(chat_template_kwargs, dict) or not all(
        isinstance(k, str) for k in chat_template_kwargs
    ):
        raise ChatTemplateOptionError(
            f"chat_template_kwargs must be a dict keyed by names, got {chat_template_kwargs!r}",
            "chat_template_kwargs",
        )
    if "messages" in chat_template_kwargs:
        raise ChatTemplateOptionError(
            "chat_template_kwargs must not set 'messages': pass the conversation",
            "chat_template_kwargs",
        )
    if "self" in chat_template_kwargs:  # also the rendering methods' own first parameter
        raise ChatTemplateOptionError(
            "chat_template_kwargs must not set 'self': in a template it names the template",
            "chat_template_kwargs",
        )
    if "tokenize" in chat_template_kwargs:  # vLLM refuses it too
        raise ChatTemplateOptionError(
            "chat_template_kwargs must not set 'tokenize': the chat is rendered, then tokenized",
            "chat_template_kwargs",
        )
    options = {
        "add_generation_prompt": add_generation_prompt,
        "continue_final_message": continue_final_message,
        "tools": tools,
        **chat_template_kwargs,
    }
    keys = ("add_generation_prompt", "continue_final_message")
    add, extend = (f"chat_template_kwargs.{k}" if k in chat_template_kwargs else k for k in keys)
    for key, name in zip(keys, (add, extend), strict=True):
        if not isinstance(options[key], bool):
            raise ChatTemplateOptionError(
                f"{name} must be a boolean, got {options[key]!r}", _field(name)
            )
    check_turn_options(options[keys[0]], options[keys[1]], (add, extend))
    return options


def _end_at_final_message(text: str, messages: list[dict]) -> str:
    """`text` cut after the last message's content, by transformers' rule: a template may
    trim the message, so its trimmed form is looked for, and its trailing whitespace is
    kept only where the whole message appears as written."""
    final = messages[-1]["content"] if messages else ""
    if not isinstance(final, str):
        raise ValueError("continue_final_message needs the last message's content as text")
    if not final.strip():  # found at the text's very end, after the turn was closed
        raise ValueError(
            "continue_final_message needs the last message to hold text to continue; "
            "to start the turn afresh, send add_generation_prompt instead"
        )
    start = text.rfind(final.strip())
    if start < 0:
        raise ValueError(
            "continue_final_message is set but the final message does not appear in the "
            "rendered chat: the chat template changes it"
        )
    end = start + len(final.lstrip())
    if text[start:end] != final:
        end = start + len(final.strip())
    return text[:end]


def _folder_chat_template(folder: Path, cfg: dict[str, Any]) -> str | None:
    """The default template, from wherever this transformers version saved it."""
    template = cfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant spans for training masks;
    for inference it renders its body unchanged."""

    tags = frozenset({"generation"})

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's built-in tojson escapes HTML characters and sorts keys; templates expect
    # plain json.dumps output.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _chat_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
