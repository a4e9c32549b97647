"""Templating with the tokenizer's own chat template, and labels exact at the token level.

Trained tokens (labels != -100) are, per assistant turn, the assistant's content and the template's
end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, `</s>`, `<end_of_turn>`, ...), so a fine-tuned model learns
to stop. They are found by rendering the conversation incrementally: for assistant turn i,

    before_i  = render(messages[:i], add_generation_prompt=True)    # prompt up to the answer's start
    through_i = render(messages[:i+1])                              # ... and through its end
    full      = render(messages)

When every `before_i` is a prefix of `through_i` and every `through_i` a prefix of `full` (the template
is prefix-stable), turn i's trained characters are `full[len(before_i):len(through_i)]` less trailing
whitespace. Otherwise each assistant content is searched in `full` in order (plus a special token that
directly follows it). `full` is tokenized once with offsets and a token is trained when its first character
falls in a trained span: the tokens are exactly those of the rendered conversation.
"""

from __future__ import annotations

from cura.constants import IGNORE_INDEX
from cura.errors import CuraError

# ChatML, for tokenizers that carry no chat template of their own
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>", "<|end|>", "<|endoftext|>")


def effective_chat_template(tokenizer) -> tuple[str, bool]:
    """`(template, is_fallback)`: the tokenizer's own chat template, or ChatML when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    if isinstance(template, str) and template.strip():
        return template, False
    return FALLBACK_CHAT_TEMPLATE, True


def render(
    tokenizer, messages: list[dict], *, add_generation_prompt: bool, template: str | None = None
) -> str:
    template = template or effective_chat_template(tokenizer)[0]
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
        )
    except Exception as exc:  # jinja raises its own errors (e.g. raise_exception in the template)
        raise CuraError(template_error(tokenizer, exc)) from None


def template_error(tokenizer, exc: Exception) -> str:
    """One sentence for a chat template that failed: a broken template (jinja syntax, with its line) or one
    that refused the conversation (raise_exception, an undefined variable), naming whose template it is."""
    import jinja2

    source = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    files = f"{source}'s tokenizer_config.json or chat_template.jinja"
    reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return (
            f"the chat template is not a valid template (line {exc.lineno}: {reason}); fix it in {files}, or "
            "use the model's original tokenizer files"
        )
    if isinstance(exc, jinja2.TemplateError):
        return (
            f"the chat template refused a conversation ({reason}); check the roles and order of the data rows "
            f"(the template is {files})"
        )
    return f"the chat template failed on a conversation ({type(exc).__name__}: {reason}); check {files}"


def render_prompt(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The text a model sees before it answers: `messages` rendered with the effective chat template."""
    return render(tokenizer, messages, add_generation_prompt=add_generation_prompt)


def split_prompt_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """`(prompt_messages, reference_text)`: all but the last assistant turn, and that turn's content."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return list(messages[:i]), messages[i]["content"]
    return list(messages), ""


def trained_spans(tokenizer, messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """`(full_text, [(start, end), ...])`: character spans of the assistant turns (see module docstring)."""
    full = render(tokenizer, messages, add_generation_prompt=False, template=template)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True, template=template)
        through = render(tokenizer, messages[: i + 1], add_generation_prompt=False, template=template)
        if not (through.startswith(before) and full.startswith(through)):
            return full, searched_spans(tokenizer, full, messages)
        end = len(through)
        while end > len(before) and through[end - 1].isspace():
            end -= 1
        spans.append((len(before), end))
    return full, spans


def searched_spans(tokenizer, full: str, messages: list[dict]) -> list[tuple[int, int]]:
    """Spans of each assistant content found in order in `full`, with a special token right after it."""
    markers = sorted(set(END_MARKERS) | set(tokenizer.all_special_tokens), key=len, reverse=True)
    spans, cursor = [], 0
    for message in messages:
        content = message["content"].strip() if message["role"] == "assistant" else message["content"]
        found = full.find(content, cursor)
        if found < 0:
            found = full.find(content.strip(), cursor)
            content = content.strip()
        if found < 0:
            raise CuraError(
                "the chat template changes the text of the messages, so the answer tokens cannot be "
                "located; set data.train_on_prompt: true or use a template that keeps the content"
            )
        end = found + len(content)
        cursor = end
        if message["role"] != "assistant":
            continue
        for marker in markers:
            if marker and full.startswith(marker, end):
                end += len(marker)
                break
        spans.append((found, end))
    return spans


def encode_messages(tokenizer, messages: list[dict], template: str, *, train_on_prompt: bool):
    """`(input_ids, labels)` for one conversation; labels are -100 outside the assistant turns."""
    full, spans = trained_spans(tokenizer, messages, template)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        starts = [start for start, _ in enc["offset_mapping"]]
    else:  # no offsets: tokenize the pieces between span boundaries one by one
        ids, starts, cursor = [], [], 0
        for cut in sorted({0, len(full), *(b for span in spans for b in span)}):
            if cut > cursor:
                piece = tokenizer(full[cursor:cut], add_special_tokens=False)["input_ids"]
                ids += piece
                starts += [cursor] * len(piece)
            cursor = cut
    if train_on_prompt:
        return ids, list(ids)
    labels = [
        token if any(start <= s < end for start, end in spans) else IGNORE_INDEX
        for token, s in zip(ids, starts)
    ]
    return ids, labels


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Plain text for language modelling: every token is trained, and EOS ends it."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids, list(ids)
