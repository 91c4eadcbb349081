"""`sr3d gateway`: the HTTP gateway alone (workers run elsewhere: `sr3d worker`)."""
from __future__ import annotations

import argparse

from service.commands.config import settings_or_exit
from service.settings import GatewaySettings


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gateway", help="run the HTTP gateway (REDIS_URL, or the embedded Redis under SR3D_DATA_DIR)")
    p.add_argument("--host", default=None, help="bind address (default SR3D_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default SR3D_PORT, 8000)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.app import create_app
    from service.heap import freeze_startup_heap
    from service.http_timeouts import uvicorn_config
    from service.logging import setup_logging

    settings = settings_or_exit(GatewaySettings, "gateway")  # worker-only variables are not read
    setup_logging(settings.log_level)
    app = create_app(settings)
    freeze_startup_heap()  # everything is imported and the routes built: keep full collections short
    config = uvicorn_config(
        app,
        settings,
        args.host or settings.host,
        args.port if args.port is not None else settings.port,
        log_config=None,  # keep our JSON logging
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
    return 0
