"""Errors that carry a message meant for a person, not a traceback.

The CLI and the chat adapters print ``str(exc)`` of these as-is, so the message must
say what went wrong and what to do about it.
"""


class GesalError(Exception):
    """Base class for failures a user can act on."""


class ModelNotFoundError(GesalError):
    """The requested model (or the bundled one) cannot be found or loaded."""


class SVFError(GesalError):
    """The model cannot be adapted as asked (e.g. no target modules match)."""
