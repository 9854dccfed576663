#!/usr/bin/env bash
# Build the CPU image from ./Dockerfile with buildah (no Docker daemon, no Docker Hub), start it as its
# own non-root user, and check it serves: /ready, a /v1/classify answer from the shipped `sentiment`
# adapter, /metrics, and a clean exit on SIGTERM within the grace period. `make image-test`; CI runs it.
#
# Needs root (apt-get, buildah storage); runs with chroot isolation, so no OCI runtime or user
# namespaces. The base image is Debian bookworm from debootstrap (its Python is 3.11), cached in
# $CACHE_DIR and in buildah's storage; buildah's layer cache keeps the unchanged steps (torch, the
# venv when pyproject is unchanged) between runs. Torch's CPU wheel comes from pip's find-links
# folder when it has one, else from the index.
#
# Settings (environment): LORASWAP_IMAGE_CACHE (default /var/cache/loraswap-image),
# LORASWAP_IMAGE_TAG (localhost/loraswap:ci-cpu), LORASWAP_STORAGE_DRIVER (overlay where the kernel
# has it and the storage is not itself on overlayfs, else vfs), LORASWAP_IMAGE_CACHE_MAX_GB (30: a
# bigger storage is pruned to the tagged images first), PYTHON (a Python with prometheus_client,
# default .venv/bin/python), PIP_CERT / PIP_FIND_LINKS / PIP_INDEX_URL (default: pip's configuration).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE_DIR=${LORASWAP_IMAGE_CACHE:-/var/cache/loraswap-image}
TAG=${LORASWAP_IMAGE_TAG:-localhost/loraswap:ci-cpu}
BASE=localhost/loraswap-base:bookworm
PYTHON=${PYTHON:-.venv/bin/python}
GRACE_S=30      # the image's grace_period_s default; the chart's terminationGracePeriodSeconds is 60
READY_S=300     # start-up on a loaded 2-core machine
STORAGE=/var/lib/containers/storage

say() { printf '\n== %s\n' "$*"; }
die() { printf 'image-test: FAIL: %s\n' "$*" >&2; exit 1; }
pip_setting() { python3 -m pip config get "global.$1" 2>/dev/null || true; }
bah() { buildah --storage-driver "$DRIVER" "$@"; }
descendants() { local c; for c in $(pgrep -P "$1"); do echo "$c"; descendants "$c"; done; }
started=$SECONDS

# --- tools --------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "run as root (apt-get, buildah storage)"
if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  say "installing buildah and debootstrap"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends buildah debootstrap
fi
[ -x "$PYTHON" ] || die "$PYTHON not found: run make install first (or set PYTHON)"
mkdir -p "$STORAGE"
if [ -n "${LORASWAP_STORAGE_DRIVER:-}" ]; then DRIVER=$LORASWAP_STORAGE_DRIVER
elif grep -qw overlay /proc/filesystems && [ "$(stat -f -c %T "$STORAGE")" != overlayfs ]; then DRIVER=overlay
else DRIVER=vfs; fi
used_gb=$(du -s --block-size=1G "$STORAGE" | cut -f1)
if [ "$used_gb" -gt "${LORASWAP_IMAGE_CACHE_MAX_GB:-30}" ]; then
  say "buildah storage holds ${used_gb} GB: removing untagged images (the layer cache)"
  bah rmi --prune >/dev/null
fi

# --- base image: debootstrap's bookworm, made once -----------------------------------------------
if ! bah inspect --type image "$BASE" >/dev/null 2>&1; then
  rootfs=$CACHE_DIR/bookworm-rootfs
  if [ ! -e "$rootfs/.complete" ]; then
    say "debootstrap bookworm into $rootfs (downloads ~100 MB of Debian packages)"
    rm -rf "$rootfs" && mkdir -p "$CACHE_DIR"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$rootfs" http://deb.debian.org/debian
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    touch "$rootfs/.complete"
  fi
  say "committing $BASE"
  base_started=$SECONDS
  ctr=$(bah from scratch)
  mnt=$(bah mount "$ctr")
  cp -a "$rootfs/." "$mnt/" && rm -f "$mnt/.complete"
  bah umount "$ctr" >/dev/null
  bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
  bah commit --rm --format docker "$ctr" "$BASE" >/dev/null
  echo "base image committed in $((SECONDS - base_started)) s"
fi

# --- build ----------------------------------------------------------------------------------------
build_args=(--build-arg VARIANT=cpu --build-arg "PYTHON_IMAGE=$BASE")
cert=${PIP_CERT:-$(pip_setting cert)}
[ -n "$cert" ] && build_args+=(--secret "id=pip_cert,src=$cert")
index=${PIP_INDEX_URL:-$(pip_setting index-url)}
[ -n "$index" ] && build_args+=(--build-arg "TORCH_CPU_INDEX=$index")
wheels=${PIP_FIND_LINKS:-$(pip_setting find-links)}
if [ -n "$wheels" ] && [ -d "$wheels" ]; then
  # The local folder replaces the official CPU index: the index then is PyPI's, whose default
  # Linux torch is the CUDA build, so the Dockerfile's CPU check guards the pick.
  build_args+=(-v "$wheels:/wheels:ro" --build-arg TORCH_FIND_LINKS=/wheels)
  [ -n "$index" ] || build_args+=(--build-arg TORCH_CPU_INDEX=https://pypi.org/simple)
fi
say "building $TAG (storage driver $DRIVER)"
build_started=$SECONDS
bah bud --layers --pull=never --format docker --isolation chroot --network host "${build_args[@]}" \
  -t "$TAG" . || die "image build failed"
build_s=$((SECONDS - build_started))

# The run below starts `loraswap serve` as this user itself: check that is what the image would run.
config=$(bah inspect --type image "$TAG" | python3 -c 'import json, sys
c = json.load(sys.stdin)["Docker"]["config"]
print(c["User"], json.dumps(c["Entrypoint"]), json.dumps(c["Cmd"]), "Healthcheck" in c)')
[ "$config" = '10001:10001 ["loraswap"] ["serve"] True' ] \
  || die "image config is '$config', want user 10001:10001, loraswap serve, a healthcheck"
user=10001:10001

# --- run as the image's user; the shipped registry mounted read-only, no hub access ---------------
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
key=ci-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
log=$(mktemp /tmp/loraswap-image-test.XXXXXX.log)
ctr=$(bah from --pull=never "$TAG")
cleanup() {
  # shellcheck disable=SC2046  # one pid a word
  [ -n "${server_pid:-}" ] && kill -KILL $(descendants "$server_pid") "$server_pid" 2>/dev/null || true
  bah rm "$ctr" >/dev/null 2>&1 || true
}
trap cleanup EXIT
say "starting the image as $user on 127.0.0.1:$port"
bah run --isolation chroot --user "$user" --network host \
  -v "$PWD/registry:/var/lib/loraswap/registry:ro" \
  --env LORASWAP_HOST=127.0.0.1 --env "LORASWAP_PORT=$port" --env HF_HUB_OFFLINE=1 \
  --env "LORASWAP_API_KEYS=[{\"key\": \"$key\", \"scopes\": [\"infer\", \"metrics\"]}]" \
  "$ctr" -- loraswap serve >"$log" 2>&1 &
server_pid=$!
url=http://127.0.0.1:$port
auth=(-H "Authorization: Bearer $key")

for ((i = 0; i < READY_S; i++)); do
  curl -sf "$url/ready" >/dev/null && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$log"; die "the server exited before /ready"; }
  sleep 1
done
curl -sf "$url/ready" >/dev/null || { cat "$log"; die "not ready after ${READY_S} s"; }
ready_s=$i
say "ready after ${ready_s} s"

answer=$(curl -sS --fail-with-body "${auth[@]}" "$url/v1/classify" \
  --json '{"adapter": "sentiment", "inputs": ["I loved this film", "a dull, boring mess"]}') \
  || die "classify failed: $answer"
echo "$answer"
python3 -c 'import json, sys
labels = [r["label"] for r in json.loads(sys.argv[1])["results"]]
sys.exit(None if labels == ["positive", "negative"] else f"classify labels {labels}")' "$answer" \
  || die "wrong classification"

curl -sS --fail-with-body "${auth[@]}" "$url/metrics" >"$log.metrics" || die "/metrics failed"
PYTHONPATH=tests/deploy "$PYTHON" - "$log.metrics" <<'EOF' || die "/metrics check"
import sys
from metric_names import EXPORTED_METRICS
from prometheus_client.parser import text_string_to_metric_families

families = {f.name: f for f in text_string_to_metric_families(open(sys.argv[1]).read())}
exposed = {(n if t != "counter" else n.removesuffix("_total")): t for n, t in EXPORTED_METRICS.items()}
wrong = {n: t for n, t in exposed.items() if n not in families or families[n].type != t}
requests = [s for s in families["loraswap_requests"].samples
            if s.name == "loraswap_requests_total" and s.labels.get("adapter") == "sentiment"]
sys.exit(f"missing or mistyped families: {wrong}" if wrong else
         None if requests and sum(s.value for s in requests) >= 1 else "no sentiment request counted")
EOF
echo "metrics: all $(PYTHONPATH=tests/deploy "$PYTHON" -c 'from metric_names import EXPORTED_METRICS as m; print(len(m))') families, sentiment counted"

# --- SIGTERM: the server itself (a descendant of buildah run), as a container runtime signals it ---
pid=
for p in $(descendants "$server_pid"); do
  grep -qa '/opt/venv/bin/loraswap' "/proc/$p/cmdline" 2>/dev/null && pid=$p
done
[ -n "$pid" ] || die "server process not found under buildah run ($server_pid)"
say "SIGTERM to pid $pid"
term_started=$SECONDS
kill -TERM "$pid"
for ((i = 0; i < GRACE_S + 5; i++)); do kill -0 "$server_pid" 2>/dev/null || break; sleep 1; done
if kill -0 "$server_pid" 2>/dev/null; then cat "$log"; die "still running ${i} s after SIGTERM"; fi
status=0 && wait "$server_pid" || status=$?
server_pid=
stop_s=$((SECONDS - term_started))
grep -q "drained" "$log" || { cat "$log"; die "no drain on SIGTERM"; }
[ "$status" = 0 ] || { cat "$log"; die "exit status $status after SIGTERM"; }

size=$(bah images --format '{{.Size}}' "$TAG" | head -1)
rm -f "$log" "$log.metrics"
say "PASS: $TAG"
printf 'image size %s; build %d s; ready %d s; SIGTERM -> exit 0 in %d s; total %d s\n' \
  "$size" "$build_s" "$ready_s" "$stop_s" "$((SECONDS - started))"
