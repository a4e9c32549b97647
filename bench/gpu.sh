#!/usr/bin/env bash
# The GPU benchmark in one command (bench/train_gpu.py says what it measures):
#
#   bash bench/gpu.sh            on an H100/H200: at most 8 minutes, writes bench/results/train_gpu.json
#   bash bench/gpu.sh --dry-run  on any CPU machine: Triton's interpreter, tiny shapes, every code path
#                                that runs without CUDA (writes $TMPDIR/cura_train_gpu_dry_run.json)
#
# Nothing is installed from the network. bitsandbytes (for the peft + bitsandbytes anchor) travels as a
# wheel in .whl/ (43 MB for 0.50.2, CUDA 11.8-13.2 binaries inside); fetch it once where pip works:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# and it is installed into a private folder (/tmp/cura-bench-site), never into the machine's python.
# Extra arguments go to bench/train_gpu.py (e.g. --models llama-3.2-1b --budget-seconds 200).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ " $* " == *" --dry-run "* ]]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
fi
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/cura-bench-site .whl/*.whl
  export PYTHONPATH="/tmp/cura-bench-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec timeout 480 "$PY" bench/train_gpu.py "$@"
