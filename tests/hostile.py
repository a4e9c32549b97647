"""The hostile-input table: inputs a hostile or unlucky user hands cura, each built in a temporary folder,
with what cura must answer (one sentence naming the file or key, a non-zero exit, no traceback).

Used by tests/test_hostile_inputs.py (one test per case) and bench/reliability.py (tried / held counts by
category). A case is `Case(category, name, make)`; `make(tmp, env)` writes its inputs under `tmp` and returns
`(target, mention)`: `target` is the `cura` argument list, or a function run the way the CLI runs a command
(`cura.cli.run_command`); `mention` is a text the message must contain. New categories (part A's run-folder
and signal cases) are added by appending cases to `CASES` or by another list passed to `run_cases`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tiny import save_tiny_chat_model, tiny_tokenizer

Target = list[str] | Callable[[], object]


@dataclass(frozen=True)
class Env:
    """What the cases share, built once: a tiny Llama folder (with the tiny ChatML tokenizer) and a small
    valid data file."""

    model: str
    data: str


@dataclass(frozen=True)
class Case:
    category: str
    name: str
    make: Callable[[Path, Env], tuple[Target, str]]
    lines: int = 1  # lines the message may take (the bad-rows report lists each row on its own line)


@dataclass
class Outcome:
    case: Case
    code: int
    message: str
    mention: str
    seconds: float

    @property
    def held(self) -> bool:
        """One sentence (exit 2, 'error: ...'), naming what it should, no traceback, no crash report."""
        return not self.problems()

    @property
    def error(self) -> str:
        """The error message: stderr from its 'error: ' line on (progress lines may come before it)."""
        lines = self.message.strip().splitlines()
        first = next((i for i, line in enumerate(lines) if line.startswith("error: ")), None)
        return "" if first is None else "\n".join(lines[first:])

    def problems(self) -> list[str]:
        text = self.error
        found = []
        if self.code != 2:
            found.append(f"exit code {self.code}, not 2")
        if "Traceback" in self.message:
            found.append("a traceback")
        if not text:
            found.append("no 'error: ' message")
        if len(text.splitlines()) > self.case.lines:
            found.append(f"{len(text.splitlines())} lines")
        if self.mention not in text:
            found.append(f"does not mention {self.mention!r}")
        return found


# ------------------------------------------------------------------------------------------------ env


def build_env(folder: Path) -> Env:
    """The tiny model folder and data file the cases start from."""

    tokenizer = tiny_tokenizer()
    model_dir = folder / "tiny-llama"
    save_tiny_chat_model(model_dir, tokenizer)
    data = folder / "train.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}"} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return Env(model=str(model_dir), data=str(data))


def copy_model(tmp: Path, env: Env, name: str = "model") -> Path:
    target = tmp / name
    shutil.copytree(env.model, target)
    return target


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")


def train_args(env: Env, tmp: Path, *extra: str) -> list[str]:
    """`cura train` on the tiny model and data, one step, with `extra` flags."""
    return [
        "train",
        "--model",
        env.model,
        "--data",
        env.data,
        "--output",
        str(tmp / "run"),
        "--max-steps",
        "1",
        "--progress",
        "false",
        "--compute-dtype",
        "float32",
        *extra,
    ]


def generate_args(model: str | Path, *extra: str) -> list[str]:
    return [
        "generate",
        "--model",
        str(model),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "1",
        "--dtype",
        "float32",
        *extra,
    ]


def inspect_args(env: Env, file: Path) -> list[str]:
    return ["data", "inspect", str(file), "--model", env.model]


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# ------------------------------------------------------------------------------------------- data rows


def data_case(name: str, content: bytes, suffix: str = ".jsonl", lines: int = 1) -> Case:
    """A data file with `content`; the message must name the file."""

    def make(tmp: Path, env: Env):
        file = tmp / f"data{suffix}"
        file.write_bytes(content)
        return inspect_args(env, file), str(file)

    return Case("data files", name, make, lines=lines)


ROW = b'{"prompt": "a", "completion": "b"}\n'
DEEP = b"[" * 10_000 + b"]" * 10_000
BIG_INT = b"9" * 5_000
LONG_FIELD = "x" * 200_000

DATA_CASES = [
    data_case(
        "latin-1 byte in a JSON Lines row",
        ROW + '{"prompt": "caf\xe9", "completion": "b"}\n'.encode("latin-1"),
        lines=2,
    ),
    data_case("UTF-16 JSON Lines file", ROW.decode().encode("utf-16"), lines=2),
    data_case("latin-1 byte in a JSON array", b'[{"prompt": "caf\xe9", "completion": "b"}]', ".json"),
    data_case("latin-1 byte in a CSV file", b"prompt,completion\ncaf\xe9,b\n", ".csv"),
    data_case(
        "10,000-level nesting in a JSON Lines row",
        ROW + b'{"prompt": ' + DEEP + b', "completion": "b"}\n',
        lines=2,
    ),
    data_case("10,000-level nesting in a JSON array", b"[" + DEEP + b"]", ".json"),
    data_case("10,000-level nesting in a JSON object", b'{"rows": ' + DEEP + b"}", ".json"),
    data_case(
        "5,000-digit integer in a JSON Lines row",
        ROW + b'{"prompt": ' + BIG_INT + b', "completion": "b"}\n',
        lines=2,
    ),
    data_case("5,000-digit integer in a JSON array", b'[{"prompt": ' + BIG_INT + b"}]", ".json"),
    data_case(
        "CSV field over 131,072 characters, unclosed quote",
        b'prompt,completion\n"' + b"x" * 70_000_000,
        ".csv",
    ),
    data_case("text that is not Parquet", b"this is not parquet\n" * 10, ".parquet"),
    data_case("truncated Parquet", b"PAR1" + os.urandom(200) + b"PAR1", ".parquet"),
    data_case("text that is not Arrow", b"this is not an arrow file\n" * 10, ".arrow"),
    data_case("random bytes as Arrow", os.urandom(512), ".arrow"),
]


def long_csv_field(tmp: Path, env: Env):
    """A CSV field over the csv module's default 131,072-character limit is read (it is data, not an
    error): the command must succeed, so this case asserts the opposite way in test_hostile_inputs."""
    file = tmp / "long.csv"
    file.write_text(f"prompt,completion\n{LONG_FIELD},b\n", encoding="utf-8")
    return file


# -------------------------------------------------------------------------------------- config files


def yaml_case(name: str, content: bytes) -> Case:
    def make(tmp: Path, env: Env):
        file = tmp / "run.yaml"
        file.write_bytes(content)
        return ["train", str(file)], str(file)

    return Case("config files", name, make)


CONFIG_CASES = [
    yaml_case("latin-1 byte in a YAML config", b"lr: 0.001\nmodel: caf\xe9\n"),
    yaml_case("10,000-level nesting in a YAML config", b"lora: " + b"[" * 10_000 + b"\n"),
    yaml_case("5,000-digit integer in a YAML config", b"max_steps: " + BIG_INT + b"\n"),
    yaml_case("YAML config that is a list", b"- lr\n- 1\n"),
    yaml_case("YAML alias to its own parent", b"lora: &a\n  target_modules: [*a]\n"),
    yaml_case(
        "YAML billion laughs",
        b"a: &a [x, x, x, x, x, x, x, x, x]\n"
        + b"".join(
            f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n".encode() for p, n in zip("abcdefgh", "bcdefghi")
        )
        + b"lora: {target_modules: *i}\n",
    ),
]


def model_json_case(name: str, content: bytes, mention_file: str = "config.json") -> Case:
    def make(tmp: Path, env: Env):
        model = copy_model(tmp, env)
        (model / mention_file).write_bytes(content)
        return generate_args(model), str(model / mention_file)

    return Case("model files", name, make)


# --------------------------------------------------------------------------------------- model files


def damaged_weights(name: str, damage: Callable[[bytes], bytes]) -> Case:
    """The tiny model with its model.safetensors replaced by `damage(original bytes)`."""

    def make(tmp: Path, env: Env):
        model = copy_model(tmp, env)
        file = model / "model.safetensors"
        file.write_bytes(damage(file.read_bytes()))
        return generate_args(model), str(file)

    return Case("model files", name, make)


def _header_of(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _widen_first_tensor(data: bytes) -> bytes:
    header, body = _header_of(data)
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [d * 2 for d in header[key]["shape"]]
    return safetensors_bytes(header, body)


def _offsets_past_end(data: bytes) -> bytes:
    header, body = _header_of(data)
    key = next(k for k in header if k != "__metadata__")
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin + len(body), end + len(body)]
    return safetensors_bytes(header, body)


def contradicting_config(name: str, **changes) -> Case:
    def make(tmp: Path, env: Env):
        model = copy_model(tmp, env)
        edit_json(model / "config.json", **changes)
        return generate_args(model), str(model / "config.json")

    return Case("model files", name, make)


def index_outside(tmp: Path, env: Env):
    model = copy_model(tmp, env)
    (model / "model.safetensors").unlink()
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"lm_head.weight": "../../etc/passwd"}}))
    return generate_args(model), "outside the model folder"


def index_absolute(tmp: Path, env: Env):
    model = copy_model(tmp, env)
    shard = tmp / "elsewhere.safetensors"
    shutil.move(model / "model.safetensors", shard)
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"lm_head.weight": str(shard)}}))
    return generate_args(model), "outside the model folder"


def index_climbing(tmp: Path, env: Env):
    model = copy_model(tmp, env)
    (model / "sub").mkdir()
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "sub/../../model/../../x.safetensors"}}))
    return generate_args(model), "outside the model folder"


def write_gguf(path: Path, arch: str = "llama", tensor_elements: int = 4096) -> None:
    """A small GGUF file written with the gguf package (one float32 tensor)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((tensor_elements // 64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_case(name: str, build: Callable[[Path], None], mention: str | None = None) -> Case:
    def make(tmp: Path, env: Env):
        file = tmp / "model.gguf"
        build(file)
        return generate_args(file), mention or str(file)

    return Case("model files", name, make)


def _truncated_gguf(path: Path) -> None:
    write_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def _header_only_gguf(path: Path) -> None:
    write_gguf(path)
    path.write_bytes(path.read_bytes()[:40])


def _random_gguf(path: Path) -> None:
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + os.urandom(400))


def _foreign_gguf(path: Path) -> None:
    write_gguf(path, arch="no-such-architecture")


def _train_on_gguf(tmp: Path, env: Env, build: Callable[[Path], None]):
    file = tmp / "model.gguf"
    build(file)
    args = train_args(env, tmp)
    args[args.index("--model") + 1] = str(file)
    return args, str(file)


MODEL_CASES = [
    model_json_case("latin-1 byte in config.json", b'{"model_type": "llama", "name": "caf\xe9"}'),
    model_json_case("10,000-level nesting in config.json", b'{"a": ' + DEEP + b"}"),
    model_json_case("config.json that is not JSON", b"model_type: llama\n"),
    damaged_weights("model.safetensors of random bytes", lambda d: os.urandom(len(d))),
    damaged_weights("model.safetensors truncated to half", lambda d: d[: len(d) // 2]),
    damaged_weights("model.safetensors of 5 bytes", lambda d: d[:5]),
    damaged_weights("safetensors header length past the end", lambda d: struct.pack("<Q", 2**62) + d[8:]),
    damaged_weights("safetensors shape inconsistent with its bytes", _widen_first_tensor),
    damaged_weights("safetensors offsets past the end", _offsets_past_end),
    contradicting_config("config.json hidden_size wider than the weights", hidden_size=128),
    contradicting_config("config.json fewer layers than stored", num_hidden_layers=1),
    contradicting_config("config.json quantization_config a string", quantization_config="yes"),
    contradicting_config("config.json of an unknown model_type", model_type="no-such-model"),
    contradicting_config("config.json vocab_size -5", vocab_size=-5),
    contradicting_config("config.json num_attention_heads 0", num_attention_heads=0),
    contradicting_config("config.json heads that do not divide hidden_size", num_attention_heads=5),
    contradicting_config("config.json num_key_value_heads 3 of 4 heads", num_key_value_heads=3),
    Case("model files", "index naming ../../etc/passwd", index_outside),
    Case("model files", "index naming an absolute shard path", index_absolute),
    Case("model files", "index naming a shard through a subfolder and ..", index_climbing),
    gguf_case("truncated .gguf", _truncated_gguf, "truncated"),
    gguf_case("GGUF of 40 bytes", _header_only_gguf),
    gguf_case("GGUF magic then random bytes", _random_gguf),
    gguf_case("GGUF of an architecture transformers cannot read", _foreign_gguf),
    gguf_case("random bytes named .gguf", lambda p: p.write_bytes(os.urandom(300))),
    Case(
        "model files", "truncated .gguf in train", lambda tmp, env: _train_on_gguf(tmp, env, _truncated_gguf)
    ),
    Case("model files", "foreign .gguf in train", lambda tmp, env: _train_on_gguf(tmp, env, _foreign_gguf)),
]


# --------------------------------------------------------------------------------------- adapters


def adapter_case(
    name: str, weights: Callable[[Path], bytes], mention: str = "adapter_model.safetensors"
) -> Case:
    def make(tmp: Path, env: Env):
        folder = tmp / "adapter"
        folder.mkdir()
        config = {
            "peft_type": "LORA",
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj"],
            "base_model_name_or_path": env.model,
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        (folder / "adapter_model.safetensors").write_bytes(weights(tmp))
        return generate_args(env.model, "--adapter", str(folder), "--no-quantize"), mention

    return Case("adapters", name, make)


def _adapter_config_latin1(tmp: Path, env: Env):
    folder = tmp / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(b'{"peft_type": "LORA", "r": 4, "note": "caf\xe9"}')
    (folder / "adapter_model.safetensors").write_bytes(safetensors_bytes({}, b""))
    return generate_args(env.model, "--adapter", str(folder)), "adapter_config.json"


ADAPTER_CASES = [
    adapter_case("adapter weights of random bytes", lambda tmp: os.urandom(4096)),
    adapter_case(
        "adapter weights truncated",
        lambda tmp: safetensors_bytes(
            {
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": {
                    "dtype": "F32",
                    "shape": [4, 64],
                    "data_offsets": [0, 1024],
                }
            },
            b"\0" * 100,
        ),
    ),
    adapter_case(
        "adapter weights with an unknown dtype",
        lambda tmp: safetensors_bytes(
            {"x.lora_A.weight": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"\0"
        ),
    ),
    Case("adapters", "latin-1 byte in adapter_config.json", _adapter_config_latin1),
]


# --------------------------------------------------------------------------------- checkpoints


def checkpoint_case(name: str, file: str, damage: Callable[[bytes], bytes]) -> Case:
    """A complete checkpoint folder (written by cura's own save) with one of its files damaged, loaded by
    `cura.train.checkpoint.load_checkpoint` (what --resume calls)."""

    def make(tmp: Path, env: Env):
        from cura.train.checkpoint import TrainerState, load_checkpoint, save_checkpoint

        param = torch.nn.Parameter(torch.ones(4))
        optimizer = torch.optim.AdamW([param], lr=1e-3)
        param.grad = torch.ones(4)
        optimizer.step()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        path = save_checkpoint(
            tmp,
            TrainerState(step=1),
            save_adapter_to=lambda folder: None,
            optimizer=optimizer,
            scheduler=scheduler,
        )
        target = path / file
        target.write_bytes(damage(target.read_bytes()))
        return (lambda: load_checkpoint(path, optimizer=optimizer, scheduler=scheduler)), str(target)

    return Case("checkpoints", name, make)


CHECKPOINT_CASES = [
    checkpoint_case(
        "optimizer.safetensors of random bytes", "optimizer.safetensors", lambda d: os.urandom(len(d))
    ),
    checkpoint_case("optimizer.safetensors truncated", "optimizer.safetensors", lambda d: d[: len(d) - 7]),
    checkpoint_case("rng.safetensors of 3 bytes", "rng.safetensors", lambda d: d[:3]),
]


# ---------------------------------------------------------------------------------- CLI numbers


def flag_case(name: str, mention: str, *flags: str) -> Case:
    def make(tmp: Path, env: Env):
        return train_args(env, tmp, *flags), mention

    return Case("command-line numbers", name, make)


NUMBER_CASES = [
    flag_case("--threads 100000", "threads", "--threads", "100000"),
    flag_case("--epochs inf", "epochs", "--max-steps", "0", "--epochs", "inf"),
    flag_case("--epochs nan", "epochs", "--max-steps", "0", "--epochs", "nan"),
    flag_case("--seed 1e23", "seed", "--seed", "1e23"),
    flag_case("--seed -1", "seed", "--seed", "-1"),
    flag_case("--adam-beta1 1.5 with adamw", "adam_beta1", "--optimizer", "adamw", "--adam-beta1", "1.5"),
    flag_case("--adam-beta2 1.0", "adam_beta2", "--adam-beta2", "1.0"),
    flag_case("--data.eval-split nan", "eval_split", "--data.eval-split", "nan"),
    flag_case("--data.eval-split inf", "eval_split", "--data.eval-split", "inf"),
    flag_case("--max-grad-norm nan", "max_grad_norm", "--max-grad-norm", "nan"),
    flag_case("--eval-batches -1", "eval_batches", "--eval-batches", "-1"),
    flag_case("--lr inf", "lr", "--lr", "inf"),
    flag_case("--lora.alpha nan", "lora.alpha", "--lora.alpha", "nan"),
    flag_case("--lora.dropout nan", "lora.dropout", "--lora.dropout", "nan"),
    flag_case("--weight-decay inf", "weight_decay", "--weight-decay", "inf"),
    flag_case("--max-steps of 30 digits", "max_steps", "--max-steps", "9" * 30),
    flag_case("--max-bad-steps 0", "max_bad_steps", "--max-bad-steps", "0"),
]


def lora_rank_too_big(tmp: Path, env: Env):
    """A rank whose adapter alone needs terabytes: the planner's preflight refuses it before any load."""
    return train_args(env, tmp, "--lora.r", "1000000000"), "--force"


NUMBER_CASES.append(Case("command-line numbers", "--lora.r 10**9 beyond the memory", lora_rank_too_big))


# ------------------------------------------------------------------------------------- output paths


def output_case(name: str, make_output: Callable[[Path], Path], mention: str) -> Case:
    def make(tmp: Path, env: Env):
        out = make_output(tmp)
        args = train_args(env, tmp)
        args[args.index("--output") + 1] = str(out)
        return args, mention

    return Case("output paths", name, make)


def _a_file(tmp: Path) -> Path:
    (tmp / "taken").write_text("a user's file\n")
    return tmp / "taken"


def _under_a_file(tmp: Path) -> Path:
    (tmp / "taken").write_text("a user's file\n")
    return tmp / "taken" / "run"


def _disk_full(tmp: Path, env: Env):
    """A real ENOSPC (/dev/full refuses every write), raised inside a command as a full disk would."""

    def command():
        with open("/dev/full", "w") as f:
            f.write("x" * 10)
            f.flush()

    return command, "no space left"


OUTPUT_CASES = [
    output_case("--output is an existing file", _a_file, "is a file"),
    output_case("--output under a file", _under_a_file, "is a file"),
    output_case("--output with a 300-character name", lambda tmp: tmp / ("r" * 300), "longer than"),
]
if Path("/dev/full").exists():
    OUTPUT_CASES.append(Case("output paths", "a full disk (ENOSPC) while writing", _disk_full))
if os.geteuid() != 0:  # root writes anywhere: a read-only folder is no obstacle to it

    def _read_only(tmp: Path) -> Path:
        locked = tmp / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return locked / "run"

    OUTPUT_CASES.append(output_case("--output under a read-only folder", _read_only, "not writable"))


# ---------------------------------------------------------------------------------- chat templates


def template_case(name: str, template: str, mention: str) -> Case:
    def make(tmp: Path, env: Env):
        model = copy_model(tmp, env)
        edit_json(model / "tokenizer_config.json", chat_template=template)
        (model / "chat_template.jinja").unlink(missing_ok=True)
        return generate_args(model), mention

    return Case("chat templates", name, make)


TEMPLATE_CASES = [
    template_case(
        "chat template with a jinja syntax error", "{% for m in messages %}{{ m['content'] }", "chat template"
    ),
    template_case(
        "chat template that raises",
        "{{ raise_exception('no system messages here') }}",
        "no system messages here",
    ),
    template_case("chat template calling an undefined function", "{{ no_such_function() }}", "chat template"),
]


def sampling_case(name: str, mention: str, *flags: str) -> Case:
    def make(tmp: Path, env: Env):
        return [*generate_args(env.model), *flags], mention

    return Case("command-line numbers", name, make)


NUMBER_CASES += [
    sampling_case("generate --temperature nan", "--temperature", "--temperature", "nan"),
    sampling_case("generate --top-p 5", "--top-p", "--top-p", "5"),
    sampling_case("generate --max-new-tokens -1", "--max-new-tokens", "--max-new-tokens", "-1"),
]

CASES: list[Case] = [
    *DATA_CASES,
    *CONFIG_CASES,
    *MODEL_CASES,
    *ADAPTER_CASES,
    *CHECKPOINT_CASES,
    *NUMBER_CASES,
    *OUTPUT_CASES,
    *TEMPLATE_CASES,
]


# ------------------------------------------------------------------------------------------ running


@contextlib.contextmanager
def cache_at(folder: Path):
    """CURA_CACHE pointed at `folder` for the block (conversions and crash reports stay in the test)."""
    old = os.environ.get("CURA_CACHE")
    os.environ["CURA_CACHE"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CURA_CACHE", None)
        else:
            os.environ["CURA_CACHE"] = old


def run_case(case: Case, tmp: Path, env: Env) -> Outcome:
    """Build the case's inputs in `tmp`, run it as the CLI would, and record what it answered."""
    from cura.cli import main, run_command

    tmp.mkdir(parents=True, exist_ok=True)
    target, mention = case.make(tmp, env)
    err = io.StringIO()
    started = time.perf_counter()
    with cache_at(tmp / "cache"), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run_command(target, [case.name]) if callable(target) else main(target)
    return Outcome(case, code, err.getvalue(), mention, time.perf_counter() - started)
