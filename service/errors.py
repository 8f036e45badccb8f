"""One error type for everything a user can get wrong.

Each error has a stable ``type`` slug (the problem+json ``type`` in the HTTP API and
the prefix of CLI messages), an HTTP status and a human ``detail``; optionally response
headers (``Retry-After``) and problem+json extension members.
"""

from __future__ import annotations

from typing import Any


class GeolocError(ValueError):
    type: str = "invalid-request"
    status: int = 400
    title: str = "Invalid request"

    def __init__(
        self,
        detail: str,
        *,
        type: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        extensions: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if type is not None:
            self.type = type
        if status is not None:
            self.status = status
        self.headers = headers or {}
        self.extensions = extensions or {}


class OverloadedError(GeolocError):
    type, status, title = "overloaded", 503, "Service overloaded"


class DeadlineExceededError(GeolocError):
    type, status, title = "timeout", 504, "Request timed out"


class DatabaseUnavailableError(GeolocError):
    type, status, title = "database-unavailable", 503, "Database unavailable"


class InputImageError(GeolocError):
    """An uploaded or named image that cannot be used."""

    type = "invalid-image"
    status = 422
    title = "Unusable image"


class ImageShapeError(InputImageError):
    type = "unsupported-image-shape"
    status = 422
    title = "Image shape not supported"


class ImageTooComplexError(InputImageError):
    type = "too-many-scans"
    status = 422
    title = "Image takes too long to decode"


class ImageTooLargeError(InputImageError):
    type = "image-too-large"
    status = 413
    title = "Image too large"


class UnsupportedMediaError(InputImageError):
    type = "unsupported-media-type"
    status = 415
    title = "Unsupported image format"


class InvalidOptionError(GeolocError):
    type = "invalid-option"
    status = 422
    title = "Invalid option"


class NotFoundError(GeolocError):
    type = "not-found"
    status = 404
    title = "Not found"


class IndexRefusedError(GeolocError):
    """A published index whose files fail their checks (checksums, manifest)."""

    type = "index-refused"
    status = 422
    title = "Index refused"


class TextQueryUnsupportedError(GeolocError):
    """A text query to a profile without a text tower."""

    type = "text-not-supported"
    status = 422
    title = "Text queries not supported"
