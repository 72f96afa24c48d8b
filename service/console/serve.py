"""`graceful serve`: the HTTP service under uvicorn (one process: FAISS indexes live in its memory)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def serve_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="graceful serve", description="Run the HTTP service (settings from GRACEFUL_* env)."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)

    import uvicorn
    from pydantic import ValidationError

    from service.app import create_app
    from service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as e:
        from service.api.bodies import validation_message

        print(f"graceful: error: bad GRACEFUL_* setting: {validation_message(e.errors())}", file=sys.stderr)
        return 2
    import logging

    logging.getLogger().setLevel(args.log_level.upper())
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from service.console.connections import header_deadline

    # What bounds a connection: service/console/connections.py.
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
        http=header_deadline(AutoHTTPProtocol, settings.http_header_timeout_s),
        timeout_keep_alive=settings.http_timeout_keep_alive_s,
        limit_concurrency=settings.http_limit_concurrency,
    )
    return 0
