"""`loraswap serve`: build settings from flags/env/YAML and run the app under uvicorn.

Refuses (exit 1, one line) to bind a non-loopback address without auth unless LORASWAP_AUTH_ENABLED=false
was given explicitly. Graceful shutdown: on SIGTERM/SIGINT `/ready` turns 503 and new API requests get
503 at once (`ctx.draining`), requests in flight (streams too) run on until they finish or
`grace_period_s` passes; then uvicorn closes the connections, the engines stop, and the process exits 0.
A second signal stops at once.
"""

from __future__ import annotations

import argparse
import logging
import time

import uvicorn

log = logging.getLogger("loraswap.server")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve the base models and adapters over HTTP")
    p.add_argument("--host", help="bind address (env LORASWAP_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (env LORASWAP_PORT, default 8000)")
    p.add_argument("--registry", help="adapter registry: directory or fsspec URL (env LORASWAP_REGISTRY)")
    p.add_argument("--config", help="YAML settings file (env LORASWAP_CONFIG)")
    p.add_argument("--preload", help="comma-separated adapter refs to load at start")
    p.add_argument("--log-level", help="debug, info, warning, error")
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.auth import KeyStore, check_bind_address
    from service.config import load_settings

    settings = load_settings(args.config, host=args.host, port=args.port, registry=args.registry,
                             preload=args.preload, log_level=args.log_level)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = KeyStore.from_settings(settings)  # a bad key configuration refuses here (exit 1, one line)
    check_bind_address(settings, keys)
    app = create_app(settings, auth=keys)
    if not keys.enabled:
        log.warning("authentication is off (no API keys configured); serving %s", settings.host)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False,  # service.request_log writes one JSON line per request
                            timeout_keep_alive=int(settings.keep_alive_s),
                            timeout_graceful_shutdown=max(1, int(settings.grace_period_s)))
    DrainingServer(config, app.state.ctx, settings.grace_period_s).run()
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains before it stops (uvicorn alone would just stop accepting connections)."""

    def __init__(self, config: uvicorn.Config, ctx, grace_period_s: float) -> None:
        super().__init__(config)
        self.ctx, self.grace = ctx, grace_period_s
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        # Runs in the signal handler: only set flags; on_tick (every 0.1 s) does the rest.
        if self.drain_deadline is not None or not self.started:
            self.force_exit = self.drain_deadline is not None  # second signal: stop now
            self.should_exit = True  # a signal while starting: stop without draining
            return
        log.info("signal %d: draining (grace %.0f s, %d request(s) in flight)", sig, self.grace, self.ctx.in_flight)
        self.ctx.draining = True
        self.drain_deadline = time.monotonic() + self.grace
        # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown and the process
        # would die by the signal instead of exiting 0.

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self.drain_deadline is None:
            return False
        if self.ctx.in_flight <= 0:
            log.info("drained: no requests in flight; shutting down")
            return True
        if time.monotonic() >= self.drain_deadline:
            log.warning("grace period (%.0f s) over with %d request(s) in flight; shutting down",
                        self.grace, self.ctx.in_flight)
            self.config.timeout_graceful_shutdown = 1
            return True
        return False
