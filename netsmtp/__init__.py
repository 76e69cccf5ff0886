"""netsmtp: a small, durable SMTP server for Python."""

import importlib

__version__ = "0.1.0"

# Public name -> module.  Imported on first use, so `python -m netsmtp
# --stdin` loads only what a session needs.
_EXPORTS = {
    "Delivery": "delivery",
    "Envelope": "envelope",
    "LMTPSession": "lmtp_session",
    "Options": "options",
    "Policy": "policy",
    "QueueRunner": "runner",
    "REPLIES": "replies",
    "SMTPError": "replies",
    "Session": "session",
    "Spool": "spool",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError("module 'netsmtp' has no attribute %r" % name)
    return getattr(importlib.import_module("." + module, __name__), name)
