"""GGUF files: a fast metadata/tensor-table reader, dequantizers, and the map to HF names.

`gguf.GGUFReader` builds a numpy view per array element, which costs several seconds
on a 49k-token vocabulary, so the header is parsed here directly; the `gguf` package
still supplies the format's constants (value types, quantization block sizes).
Dequantization is vectorised torch over whole tensors: a quantized tensor is viewed
as `[n_blocks, block_bytes]` and every field of every block is decoded at once.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from engine.config import ModelConfig, UnsupportedModelError

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# struct format and byte size of each scalar value type.
_SCALARS: dict[int, tuple[str, int]] = {
    GGUFValueType.UINT8: ("<B", 1),
    GGUFValueType.INT8: ("<b", 1),
    GGUFValueType.UINT16: ("<H", 2),
    GGUFValueType.INT16: ("<h", 2),
    GGUFValueType.UINT32: ("<I", 4),
    GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4),
    GGUFValueType.BOOL: ("<?", 1),
    GGUFValueType.UINT64: ("<Q", 8),
    GGUFValueType.INT64: ("<q", 8),
    GGUFValueType.FLOAT64: ("<d", 8),
}


class GGUFFormatError(ValueError):
    """The file is not a well-formed GGUF file."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first), i.e. GGUF's dims reversed
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: str
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    buffer: mmap.mmap  # private copy-on-write map: torch views of it are safe to mutate

    def raw(self, info: GGUFTensorInfo) -> torch.Tensor:
        """The tensor's bytes as a flat uint8 view of the mapped file (no copy)."""
        return torch.frombuffer(
            self.buffer, dtype=torch.uint8, count=info.nbytes, offset=info.offset
        )


class _Cursor:
    """Sequential little-endian reader over the mapped header."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def scalar(self, vtype: int) -> Any:
        fmt, size = _SCALARS[vtype]
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self) -> int:
        return self.scalar(GGUFValueType.UINT32)

    def u64(self) -> int:
        return self.scalar(GGUFValueType.UINT64)

    def string(self) -> str:
        n = self.u64()
        start = self.pos
        self.pos += n
        return bytes(self.buf[start : self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            return self.array()
        if vtype not in _SCALARS:
            raise GGUFFormatError(f"unknown GGUF value type {vtype} at byte {self.pos}")
        return self.scalar(vtype)

    def array(self) -> list[Any]:
        item_type = self.u32()
        count = self.u64()
        if item_type == GGUFValueType.STRING:
            return self._strings(count)
        if item_type in _SCALARS:
            fmt, size = _SCALARS[item_type]
            values = struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos)
            self.pos += size * count
            return list(values)
        return [self.value(item_type) for _ in range(count)]

    def _strings(self, count: int) -> list[str]:
        # The vocabulary and merges are ~100k strings: keep this loop minimal.
        buf, pos, out = self.buf, self.pos, []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            (n,) = unpack(buf, pos)
            pos += 8
            out.append(buf[pos : pos + n].decode("utf-8", errors="replace"))
            pos += n
        self.pos = pos
        return out


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header (metadata and tensor table) and map the file; no tensor is read."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if buf[:4] != _MAGIC:
        raise GGUFFormatError(f"{path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
    cur = _Cursor(buf)
    cur.pos = 4
    version = cur.u32()
    if version not in (2, 3):
        raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
    n_tensors, n_kv = cur.u64(), cur.u64()
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.u32())
    table = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.u64() for _ in range(cur.u32())]
        table.append((name, dims, cur.u32(), cur.u64()))
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, dims, ggml_type, rel in table:
        info = GGUFTensorInfo(
            name, tuple(reversed(dims)), ggml_type, data_start + rel, _nbytes(name, dims, ggml_type)
        )
        if info.offset + info.nbytes > len(buf):
            raise GGUFFormatError(
                f"{path}: tensor {name} runs past the end of the file (truncated download?)"
            )
        tensors[name] = info
    return GGUFFile(str(path), metadata, tensors, buf)


def _nbytes(name: str, dims: list[int], ggml_type: int) -> int:
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except ValueError:
        raise UnsupportedModelError(f"tensor {name} has unknown GGML type {ggml_type}") from None
    if dims[0] % block:
        raise GGUFFormatError(
            f"tensor {name}: row of {dims[0]} is not a multiple of the "
            f"{GGMLQuantizationType(ggml_type).name} block size {block}"
        )
    return math.prod(dims) // block * type_size


# ---------------------------------------------------------------------------------------------
# Dequantization. Each function takes `[n_blocks, block_bytes]` uint8 and returns float32
# `[n_blocks, block_elements]`; layouts follow ggml-common.h's block structs.


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """A little-endian fp16 field at byte `start` of every block, as float32 `[n, 1]`."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Low nibbles then high nibbles: ggml's order for the 32 values of a 4-bit block."""
    return torch.cat((qs & 0xF, qs >> 4), dim=-1)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * b[:, 2:].view(torch.int8).float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * (_nibbles(b[:, 2:]).float() - 8.0)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(_f16(b, 2), _f16(b, 0), _nibbles(b[:, 4:]).float())


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * (_q5_values(b[:, 2:6], b[:, 6:]).float() - 16.0)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(_f16(b, 2), _f16(b, 0), _q5_values(b[:, 4:8], b[:, 8:]).float())


_BIT = torch.arange(32, dtype=torch.int32)


def _q5_values(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1: the fifth bit of value j is bit j of a little-endian uint32."""
    high = qh.contiguous().view(torch.int32)  # [n, 1]
    return _nibbles(qs) | (((high >> _BIT) & 1) << 4).to(torch.uint8)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: eight 6-bit (scale, min) pairs packed into 12 bytes, as float `[n, 8, 1]`."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scale = torch.cat((lo & 63, (hi & 0xF) | ((lo >> 6) << 4)), dim=1)
    minimum = torch.cat((mid & 63, (hi >> 4) | ((mid >> 6) << 4)), dim=1)
    return scale.float().unsqueeze(-1), minimum.float().unsqueeze(-1)


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> 8 sub-blocks of 32: each 32-byte chunk gives its low then high nibbles."""
    qs = qs.reshape(-1, 4, 1, 32)
    return torch.cat((qs & 0xF, qs >> 4), dim=2).reshape(-1, 8, 32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    scale, minimum = _k_scales(b[:, 4:16])
    d, dmin = _f16(b, 0).unsqueeze(-1), _f16(b, 2).unsqueeze(-1)
    q = _k_nibbles(b[:, 16:144]).float()
    return (d * scale * q - dmin * minimum).reshape(-1, 256)


_SUB_BLOCK = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    scale, minimum = _k_scales(b[:, 4:16])
    d, dmin = _f16(b, 0).unsqueeze(-1), _f16(b, 2).unsqueeze(-1)
    # Bit k of qh[l] is the fifth bit of value l of sub-block k.
    high = ((b[:, 16:48].unsqueeze(1) >> _SUB_BLOCK) & 1) << 4
    q = (_k_nibbles(b[:, 48:176]) | high).float()
    return (d * scale * q - dmin * minimum).reshape(-1, 256)


_Q6_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # Each half of 128 values: ql gives 64 bytes (low nibbles = values 0..63, high = 64..127),
    # qh gives 32 bytes whose 2-bit fields k=0..3 extend values 32k..32k+31.
    ql = b[:, 0:128].reshape(-1, 2, 1, 64)
    low = torch.cat((ql & 0xF, ql >> 4), dim=2).reshape(-1, 2, 4, 32)
    high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> _Q6_SHIFTS) & 3
    q = ((low | (high << 4)).float() - 32.0).reshape(-1, 16, 16)
    scale = b[:, 192:208].view(torch.int8).float().unsqueeze(-1)
    return (_f16(b, 208).unsqueeze(-1) * scale * q).reshape(-1, 256)


_BLOCK_DEQUANTIZERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q5_1: _q5_1,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}
_FLOAT_TYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}
SUPPORTED_GGML_TYPES = tuple(
    GGMLQuantizationType(t).name for t in (*_FLOAT_TYPES, *_BLOCK_DEQUANTIZERS)
)
# Rows dequantized per chunk: bounds the float32 temporaries to a few MB each.
_CHUNK_BLOCKS = 1 << 16


def dequantize(
    raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Decode a tensor's raw uint8 bytes into `shape` in `dtype`."""
    if ggml_type in _FLOAT_TYPES:
        return raw.view(_FLOAT_TYPES[ggml_type]).reshape(shape).to(dtype)
    fn = _BLOCK_DEQUANTIZERS.get(ggml_type)
    if fn is None:
        raise _unsupported_types([ggml_type])
    _, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    blocks = raw.view(-1, type_size)
    out = torch.empty(math.prod(shape), dtype=dtype)
    block_elems = out.numel() // max(blocks.shape[0], 1)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        chunk = blocks[start : start + _CHUNK_BLOCKS]
        out[start * block_elems : (start + chunk.shape[0]) * block_elems] = fn(chunk).reshape(-1)
    return out.reshape(shape)


def _unsupported_types(types: list[int]) -> UnsupportedModelError:
    names = ", ".join(sorted({GGMLQuantizationType(t).name for t in types}))
    return UnsupportedModelError(
        f"GGUF tensor type {names} is not supported; supported types: "
        f"{', '.join(SUPPORTED_GGML_TYPES)}. Use a GGUF quantized to one of these "
        "(e.g. Q4_K_M, Q8_0 or F16)."
    )


# ---------------------------------------------------------------------------------------------
# Config and names.

_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp derives at conversion time that have no HF parameter: rope_freqs is
# folded back into `rope_scaling`.
_DERIVED = {"rope_freqs.weight"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter name of a GGUF tensor (None for derived tensors)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in _DERIVED:
        return None
    m = _LAYER_RE.match(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise UnsupportedModelError(f"unexpected GGUF tensor {gguf_name!r} for a Llama/Qwen model")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def config_from_gguf(gf: GGUFFile) -> ModelConfig:
    """Fill a `ModelConfig` from llama.cpp's metadata keys (`{arch}.*`, `tokenizer.ggml.*`)."""
    meta = gf.metadata
    arch = meta.get("general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{gf.path}: unsupported GGUF architecture {arch!r}; tokenmill runs "
            f"{', '.join(_GGUF_ARCHITECTURES)} (Llama, Qwen2/2.5, Qwen3)"
        )

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    hidden = key("embedding_length")
    heads = key("attention.head_count")
    if hidden is None or heads is None or key("block_count") is None:
        raise GGUFFormatError(
            f"{gf.path}: missing {arch}.embedding_length/block_count/attention.head_count metadata"
        )
    if "token_embd.weight" not in gf.tensors:
        raise GGUFFormatError(f"{gf.path}: no token_embd.weight tensor")
    # The embedding's rows, not the token list, size the logits (vocabularies are often
    # padded to a multiple of 64 or 128).
    vocab = gf.tensors["token_embd.weight"].shape[0]
    eos_ids = [
        meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta
    ]
    head_dim = key("attention.key_length") or hidden // heads
    theta = float(key("rope.freq_base", 10000.0))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=int(heads),
        num_key_value_heads=int(key("attention.head_count_kv") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(gf, arch, theta, int(head_dim)),
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in gf.tensors,
        attention_bias="blk.0.attn_q.bias" in gf.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in gf.tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(int(i) for i in eos_ids)),
    )


def _rope_scaling(gf: GGUFFile, arch: str, theta: float, head_dim: int) -> dict | None:
    """Rebuild the HF `rope_scaling` dict from metadata, or from Llama 3's rope_freqs tensor."""
    meta = gf.metadata
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    orig = meta.get(f"{arch}.rope.scaling.original_context_length")
    if "rope_freqs.weight" in gf.tensors:
        info = gf.tensors["rope_freqs.weight"]
        freqs = dequantize(gf.raw(info), info.ggml_type, info.shape)
        return _llama3_scaling(freqs, theta, head_dim, orig)
    if kind in (None, "none") or not factor or factor == 1.0:
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    if orig:
        scaling["original_max_position_embeddings"] = int(orig)
    return scaling


def _llama3_scaling(divisors: torch.Tensor, theta: float, head_dim: int, orig: int | None) -> dict:
    """Invert llama.cpp's rope_freqs (per-frequency divisors) into HF's llama3 parameters.

    The converter divides frequency i by 1 (short wavelengths), by `factor` (long ones) and
    by `1 / ((1 - s) / factor + s)` in between, with s = (L / wavelen - low) / (high - low).
    `s` is linear in 1 / wavelen, so a fit over the middle band gives L/(high-low) and
    -low/(high-low); the family's `low_freq_factor` of 1 (or the stored original context
    length L) pins the remaining degree of freedom.
    """
    div = divisors.double()
    factor = float(div.max())
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": orig or 8192,
    }
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    mid = (div > 1 + 1e-6) & (div < factor - 1e-6)
    if factor <= 1.0 or int(mid.sum()) < 2:
        return scaling
    smooth = (1 / div[mid] - 1 / factor) / (1 - 1 / factor)
    x = inv_freq[mid] / (2 * math.pi)  # 1 / wavelen
    fit = torch.linalg.lstsq(torch.stack((x, torch.ones_like(x)), dim=1), smooth.unsqueeze(1))
    slope, intercept = (float(v) for v in fit.solution.flatten())
    if orig:  # span = high - low = L / slope ; low = -intercept * span
        span = orig / slope
        low = -intercept * span
    else:  # assume low = 1: span = -1 / intercept ; L = slope * span
        low, span = 1.0, -1.0 / intercept
        scaling["original_max_position_embeddings"] = round(slope * span)
    scaling.update(low_freq_factor=round(low, 4), high_freq_factor=round(low + span, 4))
    return scaling


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation for Llama.

    The converter regroups each head's rows from HF's "rotate half" order (first half,
    second half) into interleaved pairs; viewing the rows as (head, dim/2, 2) and swapping
    the last two axes restores (head, 2, dim/2).
    """
    head_dim = w.shape[0] // n_heads
    return (
        w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
        .contiguous()
    )


def gguf_weight_loaders(
    gf: GGUFFile, config: ModelConfig, dtype: torch.dtype
) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """`(hf_name, load)` pairs; each `load()` dequantizes one tensor to `dtype`, with Llama's
    q/k rows back in HF order. Independent, so they can run on a thread pool."""
    known = {*_FLOAT_TYPES, *_BLOCK_DEQUANTIZERS}
    unknown = [i.ggml_type for i in gf.tensors.values() if i.ggml_type not in known]
    if unknown:  # fail before spending time on the tensors we could read
        raise _unsupported_types(unknown)
    loaders = []
    for info in gf.tensors.values():
        name = hf_name(info.name)
        if name is None:
            continue
        heads = None
        if config.architecture == "llama" and ".q_proj." in name:
            heads = config.num_attention_heads
        elif config.architecture == "llama" and ".k_proj." in name:
            heads = config.num_key_value_heads
        loaders.append((name, partial(_load_tensor, gf, info, dtype, heads)))
    return loaders


def _load_tensor(
    gf: GGUFFile, info: GGUFTensorInfo, dtype: torch.dtype, rotary_heads: int | None
) -> torch.Tensor:
    tensor = dequantize(gf.raw(info), info.ggml_type, info.shape, dtype)
    return tensor if rotary_heads is None else unpermute_rotary(tensor, rotary_heads)
