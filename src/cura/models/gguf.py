"""GGUF files -> a cached transformers folder, converted once.

transformers reads GGUF (tensor-name mapping, config, tokenizer with its chat template) but dequantizes the
whole file on every load (~20 s for the bundled 135M model). The first use therefore writes a normal
transformers folder (config.json, float32 model.safetensors, tokenizer files, generation_config.json) to

    $CURA_CACHE/models/<name>-<hash(path, size, mtime)>/     (default ~/.cache/cura/models/...)

through a temporary folder renamed into place; every later load reads that folder lazily like any other
checkpoint. A changed GGUF (new size or mtime) gets a new folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from cura.atomic import atomic_folder
from cura.models.sources import cache_root


def gguf_args(path: Path) -> tuple[str, str]:
    """(folder, gguf_file) for transformers' `from_pretrained(folder, gguf_file=...)`, naming the file by its
    absolute path.

    Note (a file name that picks another file): transformers reads the *weights* from `gguf_file` as a path
    relative to the current directory whenever such a file exists there (`os.path.isfile(gguf_file)` in
    `modeling_utils`), and only otherwise from `folder`; config and tokenizer always come from `folder`.
    So `from_pretrained("out", gguf_file="model.gguf")` run where another `model.gguf` lies loads that
    file's weights under out/model.gguf's config: a different model of the same shape (the export check of
    `--output out/model.gguf` saw logits 18.7 apart while `smol.gguf` matched). An absolute path is the
    same file in all three lookups."""
    path = Path(path).resolve()
    return str(path.parent), str(path)


def gguf_cache_folder(path: Path, name: str | None = None) -> Path:
    """The cache folder for a GGUF file, keyed by its resolved path, size and modification time."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / f"{name or path.stem}-{key}"


def cached_gguf_folder(path: Path, name: str | None = None) -> Path | None:
    """The converted folder when it already exists, else None (nothing is read from the GGUF)."""
    folder = gguf_cache_folder(path, name)
    return folder if (folder / "config.json").is_file() else None


def gguf_to_hf_folder(path: Path, name: str | None = None) -> Path:
    """The transformers folder for a GGUF file, converting it on first use."""
    folder = cached_gguf_folder(path, name)
    if folder is not None:
        return folder
    folder = gguf_cache_folder(path, name)
    try:
        with atomic_folder(folder, overwrite=False) as tmp:
            convert_gguf(Path(path), tmp)
    except FileExistsError:  # another process finished the same conversion first: keep theirs
        if not (folder / "config.json").is_file():
            raise
    return folder


def convert_gguf(path: Path, out: Path) -> None:
    """Write the GGUF's model (dequantized to float32), config and tokenizer as a transformers folder."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = gguf_args(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # Note: a GGUF-loaded config has architectures=None and a "gguf" quantization marker that would make
    # transformers treat the float32 folder as quantized; the saved folder is a plain checkpoint.
    config = model.config
    config.architectures = [type(model).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
