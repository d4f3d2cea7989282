#!/usr/bin/env bash
# The GPU machine's software stack, rebuilt on this CPU, and hld tested under it (issue 35).
#
#   bash scripts/device_stack.sh [VENV]          # build VENV (default /tmp/hld-device-stack), then test
#   STEPS=install bash scripts/device_stack.sh   # build only; STEPS=test: test an existing VENV
#
# The device as last seen: Python 3.12.3, torch 2.11.0 (the default wheel: CUDA 13), transformers 5.17.0,
# tokenizers 0.23.2, safetensors 0.8.0, accelerate 1.15.0, numpy 2.5.2, scipy, matplotlib, pyyaml, tqdm,
# tensorboard, pytest (+ xdist, timeout); no gguf, datasets, lm-eval or wandb. Pins below are those
# versions, or the nearest the index has (numpy 2.5.2 is not on PyPI: 2.4.6). PYTHON picks the
# interpreter (default: pyenv's 3.12, the device's minor release). hld goes in with --no-deps, so a
# dependency the device lacks shows here as an import error.
#
# Then: the fast tier (`pytest tests -m "not slow"`), and a smoke of each command the device runs:
# `hld train` for every arm online and cached (the tiny teacher in tests/assets), `hld cache-teacher`,
# one study job. Prints one line per smoke with its exit code; exits 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/hld-device-stack}
STEPS=${STEPS:-all}
PYTHON=${PYTHON:-$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python 2>/dev/null | tail -1)}
PYTHON=${PYTHON:-python3.12}
PINS=(torch==2.11.0 transformers==5.17.0 tokenizers==0.23.2 safetensors==0.8.0 accelerate==1.15.0 numpy==2.4.6
      scipy matplotlib pyyaml tqdm tensorboard pytest pytest-xdist pytest-timeout)

if [ "$STEPS" != test ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || exit 1
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "${PINS[@]}" || exit 1
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
[ "$STEPS" = install ] && exit 0

PY="$VENV/bin/python"
HLD="$VENV/bin/hld"
"$PY" - <<'EOF'
import importlib, sys
mods = ["torch", "transformers", "tokenizers", "safetensors", "accelerate", "numpy"]
print(f"python {sys.version.split()[0]}; " + ", ".join(f"{m} {importlib.import_module(m).__version__}" for m in mods))
print(f"hld from {importlib.import_module('hld').__file__}")
absent = [m for m in ("gguf", "datasets", "lm_eval", "wandb") if importlib.util.find_spec(m)]
assert not absent, f"the device has none of these, this venv has {absent}"
EOF
status=0
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -m pytest tests -q -m "not slow" -p no:cacheprovider 2>&1 | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || status=1

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
A=tests/assets
TINY=(teacher.model=$A/tiny_teacher "data.train=$A/c4/c4-train.*.json.gz" "data.validation=$A/c4/c4-validation.*.json.gz"
      student.preset=tiny-2l data.seq_len=32 train.batch_size=4 budget.tokens=512 train.precision=float32
      teacher.dtype=float32 data.val_tokens=256)
smoke() {  # smoke NAME CMD...: run, print the exit code, keep the log's tail on failure
  local name=$1; shift
  "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  printf '%-26s exit %s\n' "$name" "$rc"
  [ "$rc" = 0 ] || { status=1; tail -5 "$WORK/$name.log"; }
}
echo
# hld-joint: the cache holds the logits and the mapped hidden layers, what every distilled arm reads
smoke cache-teacher "$HLD" cache-teacher --config smoke --out "$WORK/cache" "${TINY[@]}" objective.method=hld-joint --quiet
for arm in ce kd hld-joint hld-first; do
  smoke "train-$arm-online" "$HLD" train --config smoke --out "$WORK/online-$arm" "${TINY[@]}" objective.method=$arm --quiet
  [ "$arm" = ce ] && continue  # ce reads no teacher signal: nothing to cache
  smoke "train-$arm-cached" "$HLD" train --config smoke --out "$WORK/cached-$arm" "${TINY[@]}" objective.method=$arm \
    teacher.cache="$WORK/cache" --quiet
done
STUDY_OVR=(); for o in "${TINY[@]}"; do case $o in student.preset=*|budget.*) ;; *) STUDY_OVR+=("$o");; esac; done
smoke study "$HLD" study --config demo --out "$WORK/study" "seeds=[0]" "budgets=[{tokens: 256}]" "tasks=[]" \
  "${STUDY_OVR[@]}" --quiet
echo "device stack: status $status"
exit $status
