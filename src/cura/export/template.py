"""Chat templates after training: which template an adapter was trained with, and the Ollama equivalent.

An adapter remembers the Jinja chat template its training data was rendered with
(`read_adapter_metadata(folder)["chat_template"]`). Serving it with another template shifts every prompt
off the distribution it learned, so merge, export, generate and eval compare the two (`check_template`).

Ollama does not run Jinja: its `Modelfile` needs a Go template. Rather than translate arbitrary Jinja, the
template is probed: it is rendered for a known conversation and matched against the three turn layouts that
cover most chat models (ChatML, Llama-3, Mistral `[INST]`). Each layout is a `TemplateStyle` of literal
pieces; the Go template and the stop tokens are built from those pieces, so a test can render the Jinja
template and the pieces for the same conversation and compare them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Probe strings: unlikely to occur in any template's own text.
_SYS, _USR, _ASST = "SYSPROBE7", "USRPROBE7", "ASSTPROBE7"


@dataclass(frozen=True)
class TemplateStyle:
    """A turn layout as literal pieces: a turn renders as `<role>_prefix + content + <role>_suffix`.

    The whole prompt is `bos + [system turn] + (user turn + assistant turn)* + user turn + assistant_prefix`.
    `stops` are the strings that end an assistant turn (Ollama's `PARAMETER stop`)."""

    name: str
    bos: str
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    stops: tuple[str, ...]
    system_in_user: bool = False  # Mistral: the system text is prepended to the first user message

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt these pieces give for `messages` (what the Modelfile's Go template renders)."""
        out, system = [self.bos], None
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system":
                if self.system_in_user:
                    system = content
                else:
                    out.append(self.system_prefix + content + self.system_suffix)
            elif role == "user":
                if system is not None:
                    content, system = f"{system}\n\n{content}", None
                out.append(self.user_prefix + content + self.user_suffix)
            else:
                out.append(self.assistant_prefix + content + self.assistant_suffix)
        if add_generation_prompt:
            out.append(self.assistant_prefix)
        return "".join(out)

    def go_template(self) -> str:
        """The Ollama `TEMPLATE`: Go text/template over `.Messages` (Ollama puts the SYSTEM text there as a
        system message). BOS is left out: llama.cpp adds it when the GGUF says `add_bos_token`."""
        if self.system_in_user:  # hold the system text until the next user turn
            system = '{{ if eq .Role "system" }}{{ $system = .Content }}'
            user = (
                '{{ else if eq .Role "user" }}'
                + _go(self.user_prefix)
                + '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}'
            )
            head = '{{ $system := "" }}'
        else:
            system = (
                '{{ if eq .Role "system" }}'
                + _go(self.system_prefix)
                + "{{ .Content }}"
                + _go(self.system_suffix)
            )
            user = '{{ else if eq .Role "user" }}' + _go(self.user_prefix)
            head = ""
        # `$last` remembers the role of the final message: no generation prompt after an assistant turn
        # (Ollama continues that turn), as the Jinja template without add_generation_prompt
        return (
            head
            + '{{ $last := "" }}{{ range .Messages }}{{ $last = .Role }}'
            + system
            + user
            + "{{ .Content }}"
            + _go(self.user_suffix)
            + '{{ else if eq .Role "assistant" }}'
            + _go(self.assistant_prefix)
            + "{{ .Content }}"
            + _go(self.assistant_suffix)
            + "{{ end }}{{ end }}"
            + '{{ if ne $last "assistant" }}'
            + _go(self.assistant_prefix)
            + "{{ end }}"
        )


def _go(text: str) -> str:
    """A literal for a Go template (only `{{` would need escaping; none of the known pieces have it)."""
    return text.replace("{{", '{{"{{"}}')


STYLES = {
    "chatml": TemplateStyle(
        name="chatml",
        bos="",
        system_prefix="<|im_start|>system\n",
        system_suffix="<|im_end|>\n",
        user_prefix="<|im_start|>user\n",
        user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        assistant_suffix="<|im_end|>\n",
        stops=("<|im_end|>", "<|im_start|>"),
    ),
    "llama3": TemplateStyle(
        name="llama3",
        bos="<|begin_of_text|>",
        system_prefix="<|start_header_id|>system<|end_header_id|>\n\n",
        system_suffix="<|eot_id|>",
        user_prefix="<|start_header_id|>user<|end_header_id|>\n\n",
        user_suffix="<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_suffix="<|eot_id|>",
        stops=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    ),
    "mistral": TemplateStyle(
        name="mistral",
        bos="<s>",
        system_prefix="",
        system_suffix="",
        user_prefix="[INST] ",
        user_suffix=" [/INST]",
        assistant_prefix="",
        assistant_suffix="</s>",
        stops=("[INST]", "[/INST]", "</s>"),
        system_in_user=True,
    ),
}


@dataclass(frozen=True)
class TemplateInfo:
    """What probing a Jinja chat template found: its style (None: unknown) and its default system prompt."""

    style: TemplateStyle | None
    default_system: str | None


def _render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def detect_style(tokenizer, template: str) -> TemplateInfo:
    """Match `template` against the known styles by rendering a probe conversation with it.

    A style matches when the template renders system + user + assistant + user exactly as the style's pieces
    do (a default system prompt, found by rendering without a system message, is allowed in place of none)."""
    convo = [
        {"role": "system", "content": _SYS},
        {"role": "user", "content": _USR},
        {"role": "assistant", "content": _ASST},
        {"role": "user", "content": _USR},
    ]
    try:
        full = _render(tokenizer, template, convo, True)
        bare = _render(tokenizer, template, convo[1:2], True)
    except Exception:  # a template that needs other roles or variables: not one of the known layouts
        return TemplateInfo(None, None)
    for style in STYLES.values():
        if style.render(convo) != full:
            continue
        if style.render(convo[1:2]) == bare:
            return TemplateInfo(style, None)
        # a default system prompt: `bare` is the system turn with some text, then the user turn
        head, tail = (
            style.bos + style.system_prefix,
            style.system_suffix + style.render(convo[1:2])[len(style.bos) :],
        )
        if not style.system_in_user and bare.startswith(head) and bare.endswith(tail):
            return TemplateInfo(style, bare[len(head) : len(bare) - len(tail)])
    return TemplateInfo(None, None)


def modelfile_text(gguf_name: str, tokenizer, template: str | None) -> tuple[str, str | None]:
    """(Modelfile content, warning or None) for the GGUF file `gguf_name` served with `template`.

    Known styles get a `TEMPLATE`, `PARAMETER stop` per end-of-turn string and the template's default
    `SYSTEM`; an unknown template gets a comment and a warning that the TEMPLATE must be written by hand."""
    lines = [f"FROM ./{gguf_name}", ""]
    info = detect_style(tokenizer, template) if template else TemplateInfo(None, None)
    if info.style is None:
        warning = (
            "the chat template is not ChatML, Llama-3 or Mistral style, so the Modelfile has no TEMPLATE: "
            "write one by hand in Go-template syntax (https://github.com/ollama/ollama/blob/main/docs/template.md)"
        )
        lines += ["# TEMPLATE: " + warning, ""]
        stops = [t for t in (getattr(tokenizer, "eos_token", None),) if t]
    else:
        warning = None
        lines += ["TEMPLATE " + _triple(info.style.go_template()), ""]
        stops = list(info.style.stops)
        eos = getattr(tokenizer, "eos_token", None)
        if eos and eos not in stops:
            stops.append(eos)
        if info.default_system:
            lines += ["SYSTEM " + _triple(info.default_system), ""]
    lines += [f"PARAMETER stop {quote(s)}" for s in stops]
    return "\n".join(lines) + "\n", warning


def quote(text: str) -> str:
    """A Modelfile string. Ollama's parser does no escape processing inside quotes (a backslash is a
    backslash), so the text is written literally: in "..." when it has no quote or line break, else in
    triple quotes (which may span lines); text containing three quotes cannot be written at all."""
    if '"""' in text or text.endswith('"'):
        from cura.errors import CuraError

        raise CuraError(
            f'{text!r} contains """ or ends in a quote, which an Ollama Modelfile string cannot hold; edit the template'
        )
    if '"' in text or "\n" in text:
        return f'"""{text}"""'
    return f'"{text}"'


def _triple(text: str) -> str:
    """A multi-line Modelfile value (TEMPLATE, SYSTEM): always in triple quotes, written literally."""
    quote(text)  # refuses text that holds """
    return f'"""{text}"""'


def check_template(adapter_dir: str | Path, tokenizer) -> str | None:
    """A warning when the adapter was trained with another chat template than `tokenizer` has, else None.

    None also when the adapter recorded no template (an adapter written by PEFT)."""
    from cura.adapters import read_adapter_metadata

    trained = read_adapter_metadata(adapter_dir).get("chat_template")
    if not trained:
        return None
    current = getattr(tokenizer, "chat_template", None)
    if isinstance(current, dict):  # several named templates
        current = current.get("default")
    if current == trained:
        return None
    what = "has no chat template" if not current else "has a different chat template"
    return (
        f"the model's tokenizer {what} than the one adapter {adapter_dir} was trained with "
        f"({Path(adapter_dir) / 'cura_adapter.json'}: chat_template); cura uses the adapter's template, "
        "so prompts are formatted as in training"
    )
