"""The one place that turns an error into an HTTP status and an OpenAI error object."""

from __future__ import annotations

import orjson

from albatross.core.errors import AlbatrossError


def error_body(exc: AlbatrossError) -> dict[str, object]:
    return {
        "error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
    }


def error_response(exc: AlbatrossError) -> tuple[int, bytes]:
    """``(status, JSON body)`` for ``exc``; client errors are 4xx, never 500."""
    return exc.status, orjson.dumps(error_body(exc))


def error_event(exc: AlbatrossError, length: int) -> bytes:
    """The final SSE event of a stream that failed after its headers were sent; like a
    finish event its id is the stream's length."""
    return b"id: %d\ndata: %b\n\n" % (length, orjson.dumps(error_body(exc)))
