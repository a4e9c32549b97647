"""Text generation with the model's chat template: batched greedy decoding and streaming chat.

`load_for_inference` is the one way the tools (generate, chat, eval) get a model with an adapter: the base
is rebuilt exactly as in training from the adapter's record (`cura.adapters.load_base_for_adapter`), the
adapter's weights are loaded on top, and the chat template the adapter was trained with is used (with a
warning when the base tokenizer's differs).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from cura.constants import DEFAULT_MAX_NEW_TOKENS
from cura.errors import CuraError

Messages = list[dict[str, str]]


def load_for_inference(
    model_source: str | None,
    adapter: str | Path | None = None,
    *,
    quantize: bool | None = None,
    compute_dtype: torch.dtype | str = "auto",
    log=lambda msg: print(msg, file=sys.stderr),
):
    """(model, tokenizer) in eval mode. With `adapter`: exactly the base it was trained on (its recorded
    source, quantization and chat template; `model_source` / `quantize` may only confirm them, see
    `cura.adapters.load_base_for_adapter`) with the adapter loaded. Without: `model_source` (4-bit NF4 unless
    `quantize=False`)."""
    from cura.hardware import default_device, resolve_compute_dtype

    if adapter is not None:
        from cura.adapters import load_base_for_adapter

        loaded = load_base_for_adapter(
            adapter, model_source, quantize=quantize, compute_dtype=compute_dtype, log=log
        )
    else:
        from cura.models import load_model

        device = default_device()
        dtype = resolve_compute_dtype(compute_dtype, device)
        loaded = load_model(
            model_source, quantize=quantize is not False, compute_dtype=dtype, device=str(device)
        )
    model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    model.config.use_cache = True
    return model, tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the end-of-turn markers common templates use, as far as the vocabulary has them."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>"):
        if marker in vocab and vocab[marker] not in ids:
            ids.append(vocab[marker])
    return ids


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, batch_size: int) -> None:
    """One sentence for sampling settings that cannot work (a NaN temperature made torch.multinomial fail
    deep inside the loop; a negative token count generated nothing without a word)."""
    if max_new_tokens < 1:
        raise CuraError(f"--max-new-tokens is {max_new_tokens}; use 1 or more")
    if not 0 <= temperature < float("inf"):
        raise CuraError(f"--temperature is {temperature}; use 0 (greedy) or a positive number such as 0.7")
    if not 0 < top_p <= 1:
        raise CuraError(f"--top-p is {top_p}; use a number above 0 and at most 1")
    if batch_size < 1:
        raise CuraError(f"batch_size is {batch_size}; use 1 or more")


def render(tokenizer, prompt: str | Messages, *, chat: bool = True) -> str:
    """The prompt as the model sees it: the chat template with the assistant turn opened."""
    if isinstance(prompt, str):
        if not chat or not getattr(tokenizer, "chat_template", None):
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    try:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a broken or refusing template: one sentence naming it (not a cura bug)
        from cura.data.template import template_error

        raise CuraError(template_error(tokenizer, exc)) from None


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str | Messages],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    chat: bool = True,
    streamer=None,
    progress: bool = False,
) -> list[str]:
    """Complete each prompt (greedy when temperature is 0), batched with left padding; returns the new text."""
    check_sampling(max_new_tokens, temperature, top_p, batch_size)
    texts = [render(tokenizer, p, chat=chat) for p in prompts]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generating", unit="batch")
    try:
        for start in starts:
            chunk = texts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            sampling = (
                {"do_sample": True, "temperature": temperature, "top_p": top_p}
                if temperature > 0
                else {"do_sample": False}
            )
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop_token_ids(tokenizer),
                pad_token_id=pad_id,
                use_cache=True,
                streamer=streamer,
                **sampling,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return [o.strip() for o in outputs]
