"""`loraswap serve`: build settings from flags/env/YAML and run the app under uvicorn."""

from __future__ import annotations

import argparse
import logging


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
    import uvicorn

    from service.app import create_app
    from service.config import load_settings

    settings = load_settings(args.config, host=args.host, port=args.port, registry=args.registry,
                             preload=args.preload, log_level=args.log_level)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=int(settings.grace_period_s))
    uvicorn.Server(config).run()
    return 0
