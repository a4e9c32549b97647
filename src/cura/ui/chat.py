"""Streaming chat for the page: the fine-tuned model's answer, then the base model's, piece by piece.

The models are loaded with `cura.generate.load_for_inference` (the adapter's recorded base, rebuilt as in
training) and kept while the server runs; answers stream through transformers' `TextIteratorStreamer`
from a worker thread, exactly as `cura chat` does. One answer is generated at a time (a lock): two
answers at once would only share the same cores.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

_models: dict[tuple[str | None, str | None], tuple] = {}
_lock = threading.Lock()
MAX_NEW_TOKENS = 256


def _load(source: str | None, adapter: Path | None):
    key = (source, str(adapter) if adapter else None)
    if key not in _models:
        from cura.generate import load_for_inference

        _models[key] = load_for_inference(source, adapter, log=lambda *_: None)
    return _models[key]


def base_source(adapter: Path) -> str:
    """The base model the adapter records (its BaseSpec source)."""
    from cura.adapters.base import read_base_record

    return read_base_record(adapter).spec.source or ""


def stream(model, tokenizer, messages: list[dict], max_new_tokens: int) -> Iterator[str]:
    """Pieces of the answer as they are generated; a failure in the worker is raised here."""
    from transformers import TextIteratorStreamer

    from cura.generate import generate

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def work():
        try:
            generate(
                model, tokenizer, [messages], max_new_tokens=max_new_tokens, streamer=streamer, batch_size=1
            )
        except BaseException as exc:  # re-raised in the streaming thread below
            failure.append(exc)
            streamer.end()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    yield from streamer
    worker.join()
    if failure:
        raise failure[0]


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def chat_events(
    adapter: Path, base: str, messages: list[dict], compare: bool, max_new_tokens: int = MAX_NEW_TOKENS
) -> Iterator[str]:
    """Server-Sent Events: `token` {side, text} for the tuned (then base) answer, `done` or `error`."""
    with _lock:
        try:
            sides = [("tuned", None, adapter)] + ([("base", base, None)] if compare else [])
            for side, source, adapter_path in sides:
                yield sse("status", {"side": side, "text": "loading the model..."})
                model, tokenizer = _load(source, adapter_path)
                yield sse("status", {"side": side, "text": ""})
                for piece in stream(model, tokenizer, messages, max_new_tokens):
                    if piece:
                        yield sse("token", {"side": side, "text": piece})
                yield sse("end", {"side": side})
            yield sse("done", {})
        except Exception as exc:  # shown on the page; the server keeps running
            from cura.errors import CuraError

            text = str(exc) if isinstance(exc, CuraError) else f"{type(exc).__name__}: {exc}"
            yield sse("error", {"text": text})
