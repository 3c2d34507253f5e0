"""JSON log lines with a correlation id per request and per socket.

What a line may carry is decided here: never bodies, phone numbers, tokens or full IP addresses.
IP addresses are cut to their network (/24 for IPv4, /48 for IPv6) by :func:`truncate_ip`.
"""

from __future__ import annotations

import contextvars
import ipaddress
import json
import logging
import sys
import time
from typing import Any

correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("correlation_id", default=None)

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


def truncate_ip(address: str | None) -> str | None:
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        cid = correlation_id.get()
        if cid:
            entry["cid"] = cid
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: tracebacks can quote request data.
            entry["exc_type"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str)


# Libraries that quote SQL parameters (numbers, credential hashes, tokens), URLs, headers or frame
# contents at their chattier levels. They log at WARNING and above only, whatever the server's level.
QUIET_LOGGERS = (
    "aiosqlite", "asyncpg", "sqlalchemy", "httpx", "httpcore", "hpack", "websockets", "multipart",
    "python_multipart",
)


def configure_logging(level: str = "INFO", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # uvicorn's own access log prints full client addresses and raw paths; ours replaces it.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
