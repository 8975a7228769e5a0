"""Domain errors, grouped by who is at fault.

Every error the gateway can answer with derives from :class:`AlbatrossError` and
carries an HTTP status hint, an OpenAI-style ``type`` and, for client errors, the
offending ``param``. :func:`albatross.gateway.errors.error_response` is the one place
that turns them into HTTP; nothing else picks a status.
"""

from __future__ import annotations


class AlbatrossError(Exception):
    """Base of all errors the gateway reports to a client."""

    status: int = 500
    type: str = "internal_error"
    headers: tuple[tuple[str, str], ...] = ()
    """Extra response headers the status calls for (e.g. ``Allow`` with 405)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ClientError(AlbatrossError):
    """The request is at fault: fix the request and send it again."""

    status = 400
    type = "invalid_request_error"


class InvalidField(ClientError):
    """A field of the request breaks a rule; ``param`` names the field."""

    def __init__(self, field: str, value: object, rule: str) -> None:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        super().__init__(f"{field}: {shown} {rule}", param=field, code="invalid_value")


class UnsupportedField(ClientError):
    """The request asks for something this gateway does not do."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}", param=field, code="unsupported_parameter")


class ModelNotFound(ClientError):
    status = 404

    def __init__(self, model: str, known: list[str]) -> None:
        super().__init__(
            f"model {model!r} does not exist; available: {', '.join(known) or 'none'}",
            param="model",
            code="model_not_found",
        )


class NotFound(ClientError):
    status = 404
    type = "not_found_error"


class MethodNotAllowed(ClientError):
    status = 405

    def __init__(self, message: str, allowed: tuple[str, ...]) -> None:
        super().__init__(message)
        self.headers = (("Allow", ", ".join(allowed)),)


class Conflict(ClientError):
    """The request does not fit the current state of what it addresses."""

    status = 409
    type = "conflict_error"


class Unauthorized(ClientError):
    status = 401
    type = "authentication_error"


class Forbidden(ClientError):
    status = 403
    type = "permission_error"


class BodyTooLarge(ClientError):
    status = 413

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit} bytes", code="body_too_large")


class EngineError(AlbatrossError):
    """An engine replica failed or misbehaved; retrying may succeed."""

    status = 502
    type = "engine_error"


class EngineLost(EngineError):
    """The connection to the engine broke mid-response (the process died or reset it)."""


class NoReplicaAvailable(EngineError):
    """No healthy replica serves the model right now."""

    status = 503


class EngineTimeout(EngineError):
    status = 504


class InternalError(AlbatrossError):
    """A bug in Albatross; it is logged with its cause."""

    status = 500
    type = "internal_error"
