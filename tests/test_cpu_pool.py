"""cura's CPU tensor pool (`cura.train.cpu_pool`, cpu_malloc: pool): built for real with the machine's C++
compiler and installed as PyTorch's CPU allocator in fresh processes (it stays for a process's life).

What it must do: hand out memory that tensors use as any other (training bit for bit as with glibc's
malloc, in float32 and in bfloat16, whose oneDNN matmuls allocate through the raw interface); reuse freed
blocks instead of mapping new ones; never hold more than its limit beyond the live tensors; survive fork
and threads; and where it cannot be built, leave the run to glibc with one sentence saying why.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cura.train import cpu_pool

REPO = Path(__file__).resolve().parents[1]
DEMO_TRAIN = REPO / "src" / "cura" / "demo" / "orders_train.jsonl"

pytestmark = pytest.mark.skipif(
    cpu_pool.buildable() is not None, reason=f"cura's CPU pool cannot be built here: {cpu_pool.buildable()}"
)


def run_python(code: str, *args: str, env: dict | None = None, timeout: float = 300) -> str:
    """`code` in a fresh interpreter; its stdout (the test fails with its stderr on a non-zero exit)."""
    import os

    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


REUSE = """
import json, torch
from cura.train import cpu_pool
from cura.train.measure import proc_status

MiB = 1 << 20
assert cpu_pool.install(64 * MiB) is None
rss = lambda: proc_status()["VmRSS"] // MiB
start = rss()
big = [torch.empty(4 * MiB) for i in range(8)]  # 8 x 16 MiB
live = cpu_pool.stats()
for i, t in enumerate(big):
    t.fill_(i)  # in place: no other pool block
assert all(float(t[0]) == i and float(t[-1]) == i for i, t in enumerate(big))
del t
big.clear()
freed = cpu_pool.stats()
after_free = rss() - start
again = [torch.empty(4 * MiB) for _ in range(4)]  # 4 x 16 MiB: the cached blocks
reused = cpu_pool.stats()
small = torch.ones(1000)  # below the pool's minimum: glibc's
del small, again
cpu_pool.empty_cache()
print(json.dumps({"live": live.__dict__, "freed": freed.__dict__, "reused": reused.__dict__,
                  "after_free_mib": after_free, "empty": cpu_pool.stats().__dict__}))
"""


def test_freed_blocks_are_reused_and_the_cache_stays_within_its_limit():
    r = json.loads(run_python(REUSE))
    MiB = 1 << 20
    assert r["live"]["live"] == 128 * MiB and r["live"]["maps"] == 8
    assert r["live"]["over_limit"] == 4  # live tensors alone passed 64 MiB with the 5th to the 8th
    # freed: only 64 MiB are kept, the rest went back to the system, and RSS shows it
    assert r["freed"]["live"] == 0 and r["freed"]["cached"] == 64 * MiB and r["freed"]["unmaps"] == 4
    assert r["after_free_mib"] < 64 + 16, r
    # the next tensors of that size come from the cache, nothing new is mapped
    assert r["reused"]["hits"] == 4 and r["reused"]["maps"] == 8
    assert r["empty"]["cached"] == 0 and r["empty"]["live"] == 0


SAFE = """
import os, threading, torch
from cura.train import cpu_pool

assert cpu_pool.install(None) is None
errors = []

def work(k):
    try:
        for i in range(200):
            a = torch.full((64 << 10,), float(k))  # 256 KiB: pool blocks, from four threads at once
            b = a * 2
            assert float(b[-1]) == 2 * k
    except Exception as err:  # noqa: BLE001
        errors.append(err)

threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
keep = torch.ones(1 << 20)
pid = os.fork()  # the child allocates and frees through the pool it inherited
if pid == 0:
    torch.set_num_threads(1)  # OpenMP's threads do not survive fork (a hang with or without the pool)
    x = torch.ones(1 << 20) + keep
    os._exit(0 if float(x.sum()) == 2 * (1 << 20) else 1)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0
print(cpu_pool.stats().hits)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork on this platform")
def test_threads_and_fork_are_safe():
    assert int(run_python(SAFE, timeout=120)) > 0


TRAIN = """
import json, sys
from cura.adapters import LoraConfig
from cura.data import DataConfig
from cura.train import TrainConfig, cpu_pool, train

source, data, out, malloc, dtype = sys.argv[1:6]
said = []
config = TrainConfig(
    model=source, output_dir=out, cpu_malloc=malloc, compute_dtype=dtype, max_steps=4, batch_size=2, seed=3,
    lr=5e-3, progress=False, save_every=0, gradient_checkpointing=True, lora=LoraConfig(r=4, alpha=8.0, dropout=0.1),
    data=DataConfig(path=data + "/train.jsonl", eval_path=data + "/eval.jsonl", max_length=128),
)
train(config, say=said.append)
stats = cpu_pool.stats()
print(json.dumps({"said": said, "pool": stats is not None, "limit": cpu_pool.limit()}))
"""


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory, chat_tokenizer):
    from tiny import save_tiny_chat_model

    source = save_tiny_chat_model(tmp_path_factory.mktemp("tiny-llama"), chat_tokenizer)
    data = tmp_path_factory.mktemp("data")
    lines = DEMO_TRAIN.read_text(encoding="utf-8").splitlines()
    (data / "train.jsonl").write_text("\n".join(lines[:24]) + "\n", encoding="utf-8")
    (data / "eval.jsonl").write_text("\n".join(lines[24:28]) + "\n", encoding="utf-8")
    return source, data


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_run_on_the_pool_trains_bit_for_bit_as_on_glibc(tiny_run_inputs, tmp_path, dtype):
    """The same run in two fresh processes, one on the pool (said in one line, limited by the plan) and one
    on glibc's malloc: identical losses and adapter tensors."""
    import torch
    from safetensors.torch import load_file

    source, data = tiny_run_inputs
    runs = {}
    for malloc in ("pool", "fast"):
        out = tmp_path / malloc
        result = json.loads(run_python(TRAIN, source, str(data), str(out), malloc, dtype).splitlines()[-1])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[malloc] = (
            result,
            [r.get("loss") for r in rows],
            load_file(out / "adapter" / "adapter_model.safetensors"),
        )
    pool, fast = runs["pool"], runs["fast"]
    said = [m for m in pool[0]["said"] if m.startswith("cpu_malloc=pool")]
    assert len(said) == 1 and "cura's caching allocator" in said[0] and "the plan's tensors" in said[0]
    assert pool[0]["pool"] and pool[0]["limit"] > 0
    assert not fast[0]["pool"]  # glibc's malloc: no pool in that process
    assert pool[1] == fast[1]
    assert pool[2].keys() == fast[2].keys() and all(torch.equal(pool[2][k], fast[2][k]) for k in pool[2])


FALLBACK = """
import sys
from cura.train import TrainConfig
from cura.train.autofit import apply_cpu_malloc

said = []
print(apply_cpu_malloc(TrainConfig(cpu_malloc=sys.argv[1], gradient_checkpointing=True), said.append))
print(said[-1] if said else "")
"""


def test_without_a_compiler_the_run_falls_back_to_glibc_in_one_sentence(tmp_path):
    """A compiler that fails: the pool is reported unavailable and memory is still made to follow the plan
    (tight); with the pool switched off by CURA_CPU_POOL=0, `auto` is glibc's rule as before the pool."""
    broken = {"CXX": str(tmp_path / "no-such-c++"), "CURA_CACHE": str(tmp_path / "cache")}
    allocator, sentence = run_python(FALLBACK, "pool", env=broken).splitlines()
    assert allocator == "tight"
    assert sentence.startswith("cpu_malloc=pool: cura's pool could not be installed (its build failed")
    assert "tight instead" in sentence
    allocator, sentence = run_python(FALLBACK, "auto", env={"CURA_CPU_POOL": "0"}).splitlines()
    assert allocator in ("fast", "tight") and "cpu_malloc=auto: " in sentence and "pool" not in sentence
    allocator, sentence = run_python(FALLBACK, "pool", env={"CURA_CPU_POOL": "0"}).splitlines()
    assert allocator in ("fast", "tight") and "cpu_malloc=auto" in sentence


def test_the_limit_follows_the_plan():
    assert cpu_pool.pool_limit(100 << 20, 8 << 30) == 100 << 20  # the plan's tensors, headroom included
    assert cpu_pool.pool_limit(None, 8 << 30) == 4 << 30  # no plan: half the memory available
    assert cpu_pool.pool_limit(None, None) is None
