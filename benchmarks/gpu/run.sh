#!/usr/bin/env bash
# One run on the device machine for a GPU session (prepare.sh first, here): installs the carried wheels,
# runs the CUDA tests, then the gen, load and cls suites on CUDA, all into $OUT. That is 8 files, the
# most that come back: device.txt (versions, GPU, each step's exit code), run.log, and each suite's JSON
# and markdown. Sized for one 600 s call; each step has its own timeout, so a hang costs only its step.
# A CPU dry run of the same steps: DEVICE=cpu QUICK=1 NO_WHEELS=1 PY=.venv/bin/python OUT=/tmp/dry bash benchmarks/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:?set OUT to the folder whose files come back}
mkdir -p "$OUT"
if [ -z "${NO_WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
for packed in .bench-encoder/*.gz .bench-cache/bases/*/*.gz; do  # prepare.sh gzips the tokenizers
  [ -e "$packed" ] && gunzip -kf "$packed"
done
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LORASWAP_CACHE_DIR=$PWD/.bench-cache LORASWAP_BENCH_ENCODER=$PWD/.bench-encoder
export LORASWAP_BENCH_GEN_SHAPE=gpt2-small  # the issue's GPU shape, also in a CPU dry run
quick=${QUICK:+--quick}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" -c "import torch, transformers, peft, fastapi; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'transformers', transformers.__version__, 'peft', peft.__version__, 'fastapi', fastapi.__version__)"
} > "$OUT/device.txt" 2>&1

step() {  # name timeout command...: run, log, record the exit code
  local name=$1 limit=$2
  shift 2
  echo "=== $name" >> "$OUT/run.log"
  timeout "$limit" "$@" >> "$OUT/run.log" 2>&1
  echo "$name rc=$?" >> "$OUT/device.txt"
}
step cuda-tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/service tests/training/test_dropout.py -k "cuda or bf16"
step gen 220 "$PY" -m benchmarks run --suite gen --device "$DEVICE" --out "$OUT" $quick
step load 140 "$PY" -m benchmarks run --suite load --device "$DEVICE" --out "$OUT" $quick
step cls 80 "$PY" -m benchmarks run --suite cls --device "$DEVICE" --out "$OUT" $quick
cat "$OUT/device.txt"
