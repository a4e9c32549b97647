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
import os
import shutil
import socket
import time
from pathlib import Path

import torch

from cura.atomic import atomic_folder
from cura.errors import CuraError
from cura.memory.gguf_meta import read_gguf_metadata
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
    """The transformers folder for a GGUF file, converting it on first use (after checking its header, and
    removing what conversions killed before they finished left in the cache)."""
    folder = cached_gguf_folder(path, name)
    if folder is not None:
        return folder
    read_gguf_metadata(path)  # a truncated or foreign file: one sentence, before transformers reads it
    folder = gguf_cache_folder(path, name)
    remove_stale_conversions(folder.parent)
    try:
        with atomic_folder(folder, overwrite=False) as tmp:
            owner = tmp / OWNER_FILE
            owner.write_text(f"{os.getpid()} {socket.gethostname()}\n", encoding="utf-8")
            convert_gguf(Path(path), tmp)
            owner.unlink()
    except FileExistsError:  # another process finished the same conversion first: keep theirs
        if not (folder / "config.json").is_file():
            raise
    return folder


OWNER_FILE = ".cura-converting"
"""written into a conversion's temporary folder: the PID and host converting, so a later run can tell a
folder whose converter died (kill -9, power loss) from one still being written"""
UNOWNED_STALE_SECONDS = 24 * 3600  # a temporary folder without an owner file (older cura) is left a day


def remove_stale_conversions(cache: Path) -> list[Path]:
    """Delete the temporary conversion folders in `cache` whose converting process is gone; returns them."""
    removed = []
    if not cache.is_dir():
        return removed
    for tmp in cache.iterdir():
        if tmp.name.startswith(".") and tmp.is_dir() and conversion_is_stale(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def conversion_is_stale(tmp: Path) -> bool:
    """True when `tmp` was being written by a process of this host that no longer runs (or, without an
    owner file, when it was last touched more than a day ago)."""
    try:
        pid_text, _, host = (tmp / OWNER_FILE).read_text(encoding="utf-8").strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        try:
            return time.time() - tmp.stat().st_mtime > UNOWNED_STALE_SECONDS
        except OSError:
            return False
    return host == socket.gethostname() and not process_alive(pid)


def process_alive(pid: int) -> bool:
    """Whether a process with this PID exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except OverflowError:
        return False
    return True


def convert_gguf(path: Path, out: Path) -> None:
    """Write the GGUF's model (dequantized to float32), config and tokenizer as a transformers folder."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = gguf_args(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as exc:
        # transformers reads the architectures it maps (llama, mistral, qwen2, gemma, phi3, ...) and raises
        # one of these for any other, or for tensors it cannot place
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CuraError(
            f"{path} cannot be read as a transformers model ({reason}); give a GGUF of an architecture "
            "transformers supports, or the model's safetensors folder"
        ) from None
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
