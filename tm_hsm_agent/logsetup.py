"""Logging to stderr (systemd's journal picks it up) with a redacting filter.

The library logs with logger arguments, never f-strings, and never passes a token
or PIN on purpose; the filter is the second line of defence for JWT-shaped strings
that slip into an exception message.
"""

from __future__ import annotations

import logging
import re
import sys

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+")


def redact(text: str) -> str:
    return _JWT.sub(lambda m: m.group(0)[:10] + "…<redacted>", text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def setup(verbosity: int = 0) -> None:
    level = logging.WARNING - 10 * min(verbosity, 2)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # urllib3's connection chatter only at -vv
    logging.getLogger("urllib3").setLevel(level if verbosity >= 2 else logging.WARNING)


def at_least_info() -> None:
    root = logging.getLogger()
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
