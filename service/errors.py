"""Typed errors of the service layer. Only the routes' exception handlers turn them into HTTP answers."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of the service's own errors."""


class BadImage(ServiceError):
    """An image that does not decode, is not PNG/JPEG/WebP, or (``GRACEFUL_IMAGE_STRICT_SIZE``) is not the
    model's input size."""


class BadRequest(ServiceError):
    """A request that is well-formed JSON but asks for something impossible (empty batch, no query...)."""


class TooLarge(ServiceError):
    """A body, batch or image larger than the configured bounds."""


class ModelNotFound(ServiceError, LookupError):
    """No model folder (or a refused one) for a version."""


class InvalidModel(ServiceError):
    """A model folder exists but is refused (bad card, bad weights, outside the models dir)."""


class IncompatibleModel(ServiceError):
    """Activating (or querying with) a version whose space differs from the gallery's."""

    def __init__(self, message: str, candidate: str | None = None) -> None:
        super().__init__(message)
        self.candidate = candidate


class CheckFailed(IncompatibleModel):
    """Activation refused because the measured compatibility check failed (``check`` holds the figures)."""

    def __init__(self, message: str, candidate: str, check: dict) -> None:
        super().__init__(message, candidate=candidate)
        self.check = check


class NoSourceKept(ServiceError, LookupError):
    """An item whose source bytes are not kept (ingested with keep_sources off, or missing from the store)."""


class NothingToExport(ServiceError):
    """An export of kept sources asked of a gallery that holds none (empty, or every source dropped)."""


class NoShadow(ServiceError, LookupError):
    """No shadow comparison of that version is running."""


class NoActiveModel(ServiceError):
    """A request needs a model to embed with, and none is active."""


class NothingToRollBack(ServiceError):
    """Rollback asked with no earlier activation to go back to."""


class BackfillConflict(ServiceError):
    """A backfill job asked for something its state forbids (a second job of a candidate, resuming a
    finished job, pausing a cancelled one)."""


class NoTransform(ServiceError, LookupError):
    """No usable vector transform between two versions (none fitted, fitted on other builds, other spaces)."""


class Overloaded(ServiceError):
    """The request was not started: too many are waiting, it waited past its deadline, or the server stops."""


class RequestTimeout(ServiceError):
    """The request's work started but did not finish within the configured time."""
