"""The one thread that runs the process's model work: base loading, every engine's forward passes, KV
moves, adapter slot copies.

Why one: torch's CPU kernels parallelize with OpenMP (libgomp in torch's Linux wheels). libgomp keeps a
team of worker threads for every thread that ever opened a parallel region, and its workers spin between
regions only while the process has no more such threads than CPUs; past that they sleep after ~100 spins,
and each of a decode step's hundreds of parallel regions then waits for a futex wake. With the model
loaded on one thread and stepped on another (as the server did: a loader thread, then each engine's own
thread) that is always the case on a 2-core machine. Measured on the project's 2-core AMD EPYC
(benchmarks/README.md, "compute thread"): a SmolLM2-135M decode step of one row took 48 ms on the thread
that loaded the model and 70 ms on a second thread; the 210 block linears alone 22 vs 30 ms.

So engines hand their work here (`run` from a plain thread, `arun` from the event loop) and the rest of the
server (HTTP, tokenizers, the registry) never runs large torch ops. Work of two engines is serialized,
which on a CPU is what sharing the cores means anyway; on a GPU the kernels are only queued from here.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_ident: int | None = None


def _init() -> None:
    global _ident
    _ident = threading.get_ident()
    torch.set_grad_enabled(False)  # grad mode is per thread; nothing here trains


_pool = ThreadPoolExecutor(1, thread_name_prefix="compute", initializer=_init)


def on_compute_thread() -> bool:
    return threading.get_ident() == _ident


def run(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) on the compute thread, waited for; called there already, it just runs."""
    if on_compute_thread():
        return fn(*args, **kwargs)
    return _pool.submit(fn, *args, **kwargs).result()


async def arun(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`run` for the event loop: awaits the compute thread without blocking the loop."""
    return await asyncio.get_running_loop().run_in_executor(_pool, functools.partial(fn, *args, **kwargs))
