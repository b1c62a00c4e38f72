"""One error hierarchy. The HTTP layer maps it to the error envelope in one place."""

from __future__ import annotations


class StacyError(Exception):
    """Base of every error we show to a caller. `code` and `status` feed the envelope."""

    code = "internal"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(StacyError):
    code, status = "bad_request", 400


class Unauthorized(StacyError):
    code, status = "unauthorized", 401


class Forbidden(StacyError):
    code, status = "forbidden", 403


class NotFound(StacyError):
    code, status = "not_found", 404


class ExecTimeout(StacyError):
    code, status = "timeout", 408


class Conflict(StacyError):
    code, status = "conflict", 409


class PayloadTooLarge(StacyError):
    code, status = "payload_too_large", 413


class ResourceLimit(StacyError):
    code, status = "resource_limit", 429


class Internal(StacyError):
    code, status = "internal", 500


class Unavailable(StacyError):
    code, status = "unavailable", 503


class ProviderError(Internal):
    """A provider failed to do what it was asked (runtime error, image pull failure...)."""


class SandboxFileError(BadRequest):
    """A file operation inside a sandbox failed: missing path, not a directory, escape attempt.

    It is the caller's input that is wrong, so it is a 400; a 404 on a file route
    always means the sandbox itself (the SDKs map 404 to SandboxNotFound).
    """


class ImageError(StacyError):
    """An image could not be resolved, pulled or unpacked."""

    code, status = "bad_request", 400


class ImageNotFound(ImageError):
    code, status = "not_found", 404


class BadGateway(StacyError):
    """The preview proxy could not talk to the sandbox's server."""

    code, status = "bad_gateway", 502


class PortClosed(BadGateway):
    """Nothing listens on the port a preview asked for."""
