"""`loraswap serve` (the real CLI path: settings, keys, DrainingServer, exit code) for test_shutdown.py,
with the generation engine slowed to STEP_SECONDS per step and without an end-of-sequence token, so that a
stream is still running when SIGTERM arrives and runs exactly to its max_tokens.

usage: python tests/e2e/tiny_serve.py STEP_SECONDS serve --host 127.0.0.1 --port N --registry DIR ...
(the bases come from LORASWAP_ENCODER_BASE / LORASWAP_DECODER_BASE, tiny folders built by the test)
"""

from __future__ import annotations

import sys
import time

import service.app
from adapters.cli import main


def _slowed(build, step_seconds: float):
    def build_engines(settings, *args, **kwargs):
        engines = build(settings, *args, **kwargs)
        for engine in engines:
            if "generation" in engine.tasks:
                run = engine.runner.run

                def slow_run(seqs, is_prefill, run=run):
                    time.sleep(step_seconds)
                    return run(seqs, is_prefill)

                engine.runner.run = slow_run
                engine.scheduler.eos_token_ids = frozenset()
        return engines

    return build_engines


if __name__ == "__main__":
    step = float(sys.argv[1])
    service.app.build_engines = _slowed(service.app.build_engines, step)
    sys.exit(main(sys.argv[2:]))
