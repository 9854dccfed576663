"""A real `loraswap serve` process on a free 127.0.0.1 port, started and stopped by the test.

Import it as `from live import live_server` (tests/ is on the pytest pythonpath).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

LORASWAP = Path(sys.executable).with_name("loraswap")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(registry: Path, *, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                timeout: float = 180.0):
    """Yield the base URL of a ready server; on exit SIGTERM it and check it stopped cleanly."""
    port = free_port()
    log = registry.parent / f"server-{port}.log"
    full_env = {**os.environ, "LORASWAP_WATCH_INTERVAL_S": "0.5", **(env or {})}
    cmd = [str(LORASWAP), "serve", "--host", "127.0.0.1", "--port", str(port), "--registry", str(registry), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {timeout}s:\n{log.read_text()[-4000:]}")
            time.sleep(0.25)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
