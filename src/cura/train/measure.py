"""Measure the real peak memory of training steps, to check the planner against (bench/memory.py, tests).

Each measurement runs in a fresh Python process (`measure_in_subprocess`), so the numbers are that run's own:

    set up the CPU allocator as `cura train` does (`cura.train.run.prepare_process`: cura's pool or glibc's)
    import torch, transformers, cura (and the model's transformers class)   -> baseline
    `build_run(config, device, with_data=False)`: the run's own model setup (4-bit base or full precision,
    LoRA, checkpointing, the run's optimizer)                                 -> setup
    reset the peak (Linux: write "5" to /proc/self/clear_refs resets VmHWM)
    `Run.step` on synthetic batches of the configured shape, a few times -> peak

CPU: peak = VmHWM (peak resident set) - baseline RSS. CUDA: `torch.cuda.max_memory_allocated()`, which does
not include the CUDA context. The batches are the loop's own (`cura.data.packing`): packed rows of two
samples each with their (B, 1, T, T) mask, or full-length unpadded rows, every position trained; for a
preference objective `cura.data.preference`'s padded pair (or KTO) batches, every answer position scored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from cura.config import from_dict

_STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


@dataclass(frozen=True)
class Measurement:
    """Bytes: `baseline` after imports, `setup` with the model built, `peak` during the steps (VmHWM on CPU,
    max_memory_allocated on CUDA); `peak_increase` = peak - baseline is what a plan's peak predicts."""

    device: str  # "cpu" or "cuda"
    baseline: int
    setup: int
    peak: int
    steps: int
    seconds_per_step: float
    hwm_reset: bool
    allocator: str | None  # the CPU allocator: pool, tight or fast (None on CUDA)

    @property
    def peak_increase(self) -> int:
        return self.peak - self.baseline


def proc_status() -> dict[str, int]:
    """Bytes of VmRSS, VmHWM, RssAnon, RssFile from /proc/self/status (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in _STATUS_KEYS:
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def synthetic_batch(vocab: int, batch_size: int, seq_len: int, packing: bool, seed: int) -> dict:
    """A batch as `cura.data.packing` makes it, every position trained: packed rows of two samples (with
    their block-causal mask and restarting positions), or full-length rows with a 0/1 mask of ones."""
    import torch

    from cura.data.packing import packed_batch, padded_batch

    g = torch.Generator().manual_seed(seed)
    lengths = [seq_len // 2, seq_len - seq_len // 2] if packing else [seq_len]
    samples = []
    for _ in range(batch_size):
        for n in lengths:
            ids = torch.randint(3, vocab, (n,), generator=g).tolist()
            samples.append({"input_ids": ids, "labels": ids})
    if packing:
        k = len(lengths)
        groups = [list(range(b * k, b * k + k)) for b in range(batch_size)]
        return packed_batch(samples, groups, seq_len, 0)
    return padded_batch(samples, list(range(batch_size)), seq_len, 0)


def synthetic_preference_batch(
    vocab: int, batch_size: int, seq_len: int, objective: str, seed: int, precomputed: bool = False
) -> dict:
    """A preference batch as `cura.data.preference.preference_batch` makes it, full length, every answer
    position scored (the planner's worst case: a one-token prompt): B pairs as 2B rows for dpo / orpo, or B
    KTO rows and their B mismatched `kl_*` rows; `precomputed`: with reference log-probabilities."""
    import torch

    from cura.data.preference import preference_batch

    g = torch.Generator().manual_seed(seed)

    def answer() -> list[int]:
        return torch.randint(3, vocab, (seq_len - 1,), generator=g).tolist()

    samples = []
    for i in range(batch_size):
        s: dict = {"prompt_ids": [1]}
        if objective == "kto":
            ids = answer()
            s.update(completion_ids=ids, completion_labels=ids, label=i % 2 == 0, kl_partner=i - 1)
            if precomputed:
                s.update(ref_logp=-1.0, ref_kl_logp=-1.0)
        else:
            chosen, rejected = answer(), answer()
            s.update(chosen_ids=chosen, chosen_labels=chosen, rejected_ids=rejected, rejected_labels=rejected)
            if precomputed:
                s.update(ref_chosen_logp=-1.0, ref_rejected_logp=-1.0)
        samples.append(s)
    if objective == "kto":
        samples[0]["kl_partner"] = batch_size - 1
    return preference_batch(samples, list(range(batch_size)), seq_len, 0)


def _import_model_class(folder) -> None:
    """Import the transformers modeling module of the folder's architecture before the baseline."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    AutoModelForCausalLM._model_mapping[type(config)]


def measure_steps(source: str, config, *, steps: int = 3, device: str = "cpu") -> Measurement:
    """Build `source` as `cura.train` does for `config` (a TrainConfig) and run `steps` optimizer steps;
    call it in a fresh process. On a CPU, config.cpu_malloc decides the allocator as in a run."""
    import torch

    from cura.models.loading import hf_folder
    from cura.models.sources import resolve_source
    from cura.train.run import build_run, prepare_process

    config = config.replace(model=source)
    _, allocator = prepare_process(config, torch.device(device), say=lambda message: None)
    _import_model_class(hf_folder(*resolve_source(source)))
    on_cuda = device == "cuda"
    baseline = torch.cuda.memory_allocated() if on_cuda else proc_status()["VmRSS"]

    run = build_run(config, torch.device(device), with_data=False)
    vocab = run.model.config.vocab_size
    setup = torch.cuda.memory_allocated() if on_cuda else proc_status()["VmRSS"]
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        reset = True
    else:
        reset = reset_peak_rss()
    start = time.perf_counter()
    for step in range(steps):
        if config.objective == "sft":
            batch = synthetic_batch(
                vocab, config.batch_size, config.data.max_length, config.data.packing, step
            )
        else:
            batch = synthetic_preference_batch(
                vocab,
                config.batch_size,
                config.data.max_length,
                config.objective,
                step,
                precomputed=config.preference.precompute_reference,
            )
        run.step([batch])
        del batch
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() if on_cuda else proc_status()["VmHWM"]
    return Measurement(device, baseline, setup, peak, steps, seconds, reset, allocator)


def measure_in_subprocess(
    source: str,
    settings: dict,
    *,
    steps: int = 3,
    device: str = "cpu",
    timeout: float = 600,
) -> Measurement:
    """`measure_steps` in a fresh `python -m cura.train.measure` process; `settings` are TrainConfig keys
    as nested plain data (e.g. {"batch_size": 2, "cpu_malloc": "tight", "data": {"max_length": 256}})."""
    request = {
        "source": source,
        "settings": settings,
        "steps": steps,
        "device": device,
    }
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "cura.train.measure", json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"measurement failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def _main(argv: list[str]) -> int:
    import transformers  # noqa: F401  (imported before the baseline, as in any training process)

    from cura.train.config import TrainConfig

    request = json.loads(argv[0])
    config = from_dict(TrainConfig, request["settings"])
    result = measure_steps(
        request["source"],
        config,
        steps=request["steps"],
        device=request["device"],
    )
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
