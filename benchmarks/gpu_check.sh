#!/usr/bin/env bash
# The GPU check, in one run on a single H100/H200 machine without network (torch and transformers
# installed there, no datasets/gguf/lm-eval). From the repository root:
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine (about 5-8 minutes)
#   TINY=1 bash benchmarks/gpu_check.sh     # tiny shapes on CPU: checks this script end to end
#
# 1. installs wheels found in .whl/ (--no-index: the packages listed in benchmarks/device-wheels.txt, fetched
#    beforehand with `bash scripts/fetch_device_wheels.sh`) and hld itself (editable, --no-deps);
# 1b. gpu_first.py, at most 4 minutes: the riskiest CUDA paths once each (every arm's bf16 step online
#    and cached under torch.cuda.set_sync_debug_mode("warn"), sampled KD, a 2-shard cache build, fsdp2
#    on one GPU, the fused head vs the naive loss, hld eval, a compiled step), a pass/fail table with
#    each failure's first error, every check run whatever failed before it;
# 2. runs the test suite on CUDA (GGUF tests excluded: no gguf package there);
# 3. kd_loss.py: the fused chunked head+CE+KD vs naive full-logit losses, N=4096, V=262144, bf16;
# 4. step.py: paper-123m student, random Gemma-3-4B-shaped teacher, 4 x 2048 tokens, bf16:
#    ours vs a naive HF step over the same models (tokens/s, peak memory, MFU);
# 5. the anchor naive_hf_step.py (../shared/anchors, else the copy in benchmarks/) in the same run;
#    5b. cache_read.py: the teacher cache's decode rate on the node's CPUs, 1/4/8 worker threads;
# 6. a table of the two, with ratios (benchmarks/gpu_summary.py).
# Logs and JSON go to $OUT/gpu_check (or a temporary folder when OUT is unset).
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=${TINY:-0}
PY=${PYTHON:-python3}
LOG=${OUT:-$(mktemp -d)}/gpu_check
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "logs: $LOG"
status=0
step() { echo; echo "=== $* ==="; }

step "1. install"
if [ "$TINY" != 1 ] || [ "${INSTALL:-0}" = 1 ]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-deps --no-index .whl/*.whl || status=1
  fi
  $PY -m pip install -q --no-deps --no-build-isolation -e . || { echo "hld did not install"; exit 1; }
else
  echo "TINY=1: using the hld already installed (INSTALL=1 to reinstall)"
fi
$PY - <<'PY' | tee "$LOG/env.txt"
import torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python {__import__('sys').version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, GPU {gpu}")
PY

step "1b. first checks (at most 4 minutes)"
FIRST_S=240; [ "$TINY" = 1 ] && FIRST_S=600  # a 2-core CPU under load needs 2-4 minutes of its own
timeout $FIRST_S $PY benchmarks/gpu_first.py --out "$LOG/first" 2>"$LOG/first.err" | tee "$LOG/first.log"
[ "${PIPESTATUS[0]}" = 0 ] || { status=1; echo "first checks: failures or time out (tracebacks in $LOG/first/errors.log)"; }

step "2. tests"
if [ "$TINY" = 1 ]; then
  # on this CPU the whole suite takes minutes: collect it, and run the fused-loss tests
  $PY -m pytest tests -q -x -k "not gguf" --co -q >"$LOG/tests.log" 2>&1 && tail -1 "$LOG/tests.log" || status=1
  $PY -m pytest tests/unit/test_chunked.py -q -x 2>&1 | tee -a "$LOG/tests.log" | tail -3 || status=1
else
  $PY -m pytest tests -q -x -k "not gguf" 2>&1 | tee "$LOG/tests.log" | tail -15
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

step "3. kd_loss"
if [ "$TINY" = 1 ]; then KD_ARGS=(--tokens 256 --vocab-size 8192 --repeats 1); else KD_ARGS=(--tokens 4096); fi
$PY benchmarks/kd_loss.py "${KD_ARGS[@]}" --json 2>"$LOG/kd_loss.err" | tee "$LOG/kd_loss.log" | head -n -1
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "4. step benchmark: paper-123m student, Gemma-3-4B-shaped teacher"
if [ "$TINY" = 1 ]; then
  STEP_ARGS=(--tiny --teacher-shape gemma3-4b --student tiny-2l --n-pairs 1)
else
  STEP_ARGS=(--teacher-shape gemma3-4b --student paper-123m --batch-size 4 --seq-len 2048 --chunk-tokens 2048
             --n-pairs 4 --steps 3)
fi
$PY benchmarks/step.py "${STEP_ARGS[@]}" --json 2>"$LOG/step.err" | tee "$LOG/step.log" | head -n -1
[ "${PIPESTATUS[0]}" = 0 ] || { status=1; tail -5 "$LOG/step.err"; }

step "5. anchor: naive HF step"
ANCHOR=../shared/anchors/naive_hf_step.py
[ -f "$ANCHOR" ] || ANCHOR=shared/anchors/naive_hf_step.py
[ -f "$ANCHOR" ] || ANCHOR=benchmarks/anchors_naive_hf_step.py
echo "anchor: $ANCHOR"
TINY=$TINY $PY "$ANCHOR" 2>"$LOG/anchor.err" | tee "$LOG/anchor.log"
[ "${PIPESTATUS[0]}" = 0 ] || { status=1; tail -5 "$LOG/anchor.err"; }

step "5b. teacher cache read on this node's CPUs (decoded tokens/s vs the step rate of 4.)"
CACHE_ARGS=(--workers 1 4 8 --repeats 3)
[ "$TINY" = 1 ] && CACHE_ARGS=(--tiny --workers 1 2 --repeats 1)
$PY benchmarks/cache_read.py "${CACHE_ARGS[@]}" --json 2>"$LOG/cache_read.err" | tee "$LOG/cache_read.log" | head -n -1
[ "${PIPESTATUS[0]}" = 0 ] || { status=1; tail -5 "$LOG/cache_read.err"; }

step "6. summary"
$PY benchmarks/gpu_summary.py "$LOG/step.log" "$LOG/anchor.log" | tee "$LOG/summary.txt" || status=1
echo
echo "gpu_check finished with status $status (logs in $LOG)"
exit $status
