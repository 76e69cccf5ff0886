"""The server's TLS context: the ssl module's secure defaults, TLS 1.2 at least.

Only imported when TLS is configured, so a plain --stdin session never loads
ssl.  server_context() reloads the certificate when its file changes, so a
renewed certificate is used without a restart: by the next forked child or
inetd process (each checks the files when it first needs TLS) and by any
long-lived process on its next handshake.
"""

import logging
import os
import ssl

log = logging.getLogger(__name__)

_loaded = {}  # (cert, key) -> ((cert mtime, key mtime), SSLContext)


class TLSConfigError(Exception):
    """The certificate or key cannot be loaded; the message says which and why."""


def server_context(cert, key=None):
    """An SSLContext for the server side; cached until a file changes."""
    key = key or cert
    try:
        stamp = (os.stat(cert).st_mtime_ns, os.stat(key).st_mtime_ns)
    except OSError as exc:
        raise TLSConfigError("cannot read %s: %s" % (exc.filename, exc.strerror)) from None
    cached = _loaded.get((cert, key))
    if cached is not None and cached[0] == stamp:
        return cached[1]
    # PROTOCOL_TLS_SERVER with create_default_context's choices: no SSLv3,
    # no compression, server cipher order, forward-secret AEAD ciphers.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996: not 1.0 or 1.1
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError("cannot load %s / %s: %s" % (cert, key, exc)) from None
    if cached is not None:
        log.info("reloaded TLS certificate %s", cert)
    _loaded[(cert, key)] = (stamp, context)
    return context

