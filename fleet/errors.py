"""One exception tree for fleet.

Every error carries what the user must fix, survives pickling (so it crosses Ray
actor boundaries intact), and maps to a CLI exit code and an HTTP status.
"""

from __future__ import annotations


class FleetError(Exception):
    """Base of every fleet error."""

    exit_code = 2
    http_status = 400
    code = "fleet_error"

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def __reduce__(self):  # picklable with keyword context
        return (_rebuild, (type(self), self.message, self.context))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls, message, context):
    return cls(message, **context)


class ConfigError(FleetError):
    """The configuration file or an environment override is invalid."""

    code = "config_error"


class InvalidIdError(FleetError):
    """A tenant/model id does not match the id grammar."""

    code = "invalid_id"


class ValidationError(FleetError):
    """Input data (a file, a request body, a parameter) is malformed."""

    code = "invalid_request_error"


class NotFoundError(FleetError):
    """A model, tenant, version, key or object does not exist."""

    http_status = 404
    code = "not_found"


class ConflictError(FleetError):
    """The request conflicts with what is stored (duplicate id, wrong state)."""

    http_status = 409
    code = "conflict"


class AuthError(FleetError):
    """Missing or wrong API key."""

    http_status = 401
    code = "invalid_api_key"


class RateLimitError(FleetError):
    http_status = 429
    code = "rate_limit_exceeded"


class OverloadedError(FleetError):
    http_status = 503
    code = "overloaded"


class IntegrityError(FleetError):
    """A stored object does not match its registered sha256; it is never loaded."""

    exit_code = 3
    http_status = 500
    code = "integrity_error"


class UnavailableError(FleetError):
    """A backing service (database, object store, Ray) cannot be reached after retries."""

    exit_code = 3
    http_status = 503
    code = "unavailable"


class UnsupportedAdapterError(ValidationError):
    """A PEFT adapter uses a feature the engine does not implement (DoRA, bias, non-linear targets)."""

    code = "unsupported_adapter"


class CapacityError(FleetError):
    """Not enough slots, memory or slices for the request."""

    exit_code = 3
    http_status = 503
    code = "capacity"


class NotBuiltError(FleetError):
    """A capability that this release does not provide yet."""

    exit_code = 4
    http_status = 501
    code = "not_implemented"
