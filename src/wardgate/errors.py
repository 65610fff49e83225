"""Errors shared by every layer; each carries a message a person can act on.

The auth API maps these to HTTP statuses, and the typed client maps them back, so callers
in any process catch the same classes.
"""

from __future__ import annotations


class WardgateError(Exception):
    """Base for errors we raise on purpose; `str()` is safe to show to users."""

    status = 500
    code = "internal"


class BadParameterError(WardgateError):
    status = 400
    code = "bad_parameter"


class NotFoundError(WardgateError):
    status = 404
    code = "not_found"


class AlreadyExistsError(WardgateError):
    status = 409
    code = "already_exists"


class CompareFailedError(WardgateError):
    status = 412
    code = "compare_failed"


class AccessDeniedError(WardgateError):
    status = 403
    code = "access_denied"


class AuthenticationError(WardgateError):
    """Wrong credentials; deliberately vague about which part was wrong."""

    status = 401
    code = "authentication_failed"


class LockedError(AccessDeniedError):
    code = "locked"


class LimitExceededError(WardgateError):
    status = 429
    code = "limit_exceeded"


ERRORS_BY_CODE: dict[str, type[WardgateError]] = {
    cls.code: cls
    for cls in (
        WardgateError,
        BadParameterError,
        NotFoundError,
        AlreadyExistsError,
        CompareFailedError,
        AccessDeniedError,
        AuthenticationError,
        LockedError,
        LimitExceededError,
    )
}
