#!/usr/bin/env bash
# One run on the device machine for a GPU session (prepare.sh first, here): installs the carried wheels,
# runs the Triton kernel tests and the kernels suite (the multi-LoRA paths per linear, the newest and least
# measured code, so first), the CUDA tests, then the cls, gen and load suites on CUDA. At most 8 files come
# back, so the suites write to /tmp/bench and $OUT gets: device.txt (versions, GPU, each step's exit code),
# run.log, each suite's JSON and tables.md (every suite's markdown, one after another), rebuilt after each
# suite so a run cut short keeps what finished. Sized for one 600 s call; each step has its own timeout.
# A CPU dry run of the same steps: DEVICE=cpu QUICK=1 NO_WHEELS=1 PY=.venv/bin/python OUT=/tmp/dry bash benchmarks/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:?set OUT to the folder whose files come back}
BENCH=/tmp/bench
mkdir -p "$OUT" "$BENCH"
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
  # The image's triton (its ~290 MB wheel is over what a call can carry): without it the Triton paths fall back.
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
} > "$OUT/device.txt" 2>&1

step() {  # name timeout command...: run, log, record the exit code
  local name=$1 limit=$2
  shift 2
  echo "=== $name" >> "$OUT/run.log"
  timeout "$limit" "$@" >> "$OUT/run.log" 2>&1
  echo "$name rc=$?" >> "$OUT/device.txt"
}
collect() {  # the suites' JSONs as they are, their markdown as one file
  cp "$BENCH"/*.json "$OUT"/ 2>/dev/null
  for md in "$BENCH"/*.md; do [ -e "$md" ] && { echo "<!-- $(basename "$md") -->"; cat "$md"; echo; }; done > "$OUT/tables.md"
}
bench=("$PY" -m benchmarks run --device "$DEVICE" --out "$BENCH" $quick)
step kernel-tests 80 "$PY" -m pytest -q -p no:cacheprovider tests/service/engine/test_triton_lora.py
step kernels 70 "${bench[@]}" --suite kernels; collect
step cuda-tests 100 "$PY" -m pytest -q -p no:cacheprovider tests/service tests/training/test_dropout.py -k "cuda or bf16" \
  --ignore=tests/service/engine/test_triton_lora.py  # run above
step cls 60 "${bench[@]}" --suite cls; collect
step gen 180 "${bench[@]}" --suite gen; collect
step load 90 "${bench[@]}" --suite load; collect
cat "$OUT/device.txt"
