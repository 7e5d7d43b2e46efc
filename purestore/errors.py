"""The one exception hierarchy of purestore.

Every error a user can cause derives from :class:`PurestoreError`; the CLI prints it as
``error: <message>`` and exits non-zero.  Errors also subclass the matching built-in so that
callers who know nothing of purestore can still catch them sensibly.
"""

from __future__ import annotations


class PurestoreError(Exception):
    """Base of every purestore error.  ``hint`` (optional) tells the user what to do."""

    exit_status = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class FormatError(PurestoreError, ValueError):
    """Raised when bytes or text in a shared format (hash, NAR, narinfo, .drv, key) are malformed."""


class BadHash(FormatError):
    """Raised when a hash string cannot be parsed or has the wrong algorithm or length."""


class InvalidStorePath(FormatError):
    """Raised when a string is not a valid store path or store path name."""


class NarError(FormatError):
    """Raised when a NAR stream is malformed; the message names the byte offset."""

    def __init__(self, message: str, offset: int | None = None, **kw):
        if offset is not None:
            message = f"{message} (at NAR offset {offset})"
        super().__init__(message, **kw)
        self.offset = offset


class NarInfoError(FormatError):
    """Raised when a narinfo is malformed; the message names the line."""


class KeyError_(FormatError):
    """Raised when a signing key file is malformed."""


class SignatureError(PurestoreError):
    """Raised when a signature does not verify or is by an untrusted key."""


class DerivationError(FormatError):
    """Raised when a .drv file or a derivation value is malformed."""


class StoreError(PurestoreError, OSError):
    """Raised for store-level failures (missing paths, I/O errors at the storage boundary)."""


class PathNotValid(StoreError):
    """Raised when a path is asked for that the store does not hold as valid."""


class PathInUse(StoreError):
    """Raised when deleting a path that is still referenced or rooted."""


class EvalError(PurestoreError):
    """Raised when evaluating a build expression fails."""


class PurityError(EvalError, PermissionError):
    """Raised when an expression does something pure evaluation forbids."""


class BuildError(PurestoreError):
    """Raised when a derivation fails to build."""


class SandboxError(BuildError):
    """Raised when the build sandbox cannot be set up."""


class HashMismatch(BuildError):
    """Raised when a fixed-output derivation's output does not match its declared hash."""


class CacheError(PurestoreError):
    """Raised for binary cache failures (missing, unreachable, untrusted, corrupt)."""


class CopyIncomplete(CacheError):
    """A copy that did some of its paths but not all: ``result`` is what it did (the command's
    result type, for its ``--json``), ``failures`` each path that failed and why."""

    def __init__(self, message: str, *, result, failures: dict, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.result = result
        self.failures = failures


class UsageError(PurestoreError):
    """Raised when a command is called with inconsistent arguments."""

    exit_status = 2


class ProvenanceError(SignatureError):
    """Raised when a provenance statement is malformed, unsigned, signed by an untrusted key, does
    not verify, or is about other content than the store path it is checked against."""


class SbomError(PurestoreError):
    """Raised when an SBOM cannot be made (unknown deriver, missing derivation, bad format)."""


class DerivationArgumentError(EvalError, TypeError):
    """Raised when ``derivation()`` (or a helper built on it) gets a bad argument: the message names
    the derivation, the field, the expected type and the value."""


class ProfileError(PurestoreError):
    """Raised when a profile operation cannot be done (unknown profile or generation, nothing to
    roll back to, colliding files between installed packages, an element not installed)."""


class ShellError(PurestoreError):
    """Raised when ``pure shell``/``pure run`` cannot set up or start what was asked (no program
    to run, no namespace support for a rooted store)."""
