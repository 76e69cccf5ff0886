"""The envelope: who sent a message to whom, how, and when.

The session builds one per transaction; the spool freezes it as one line of
JSON in front of the raw message, and Envelope.thaw() gives it back as a live
object.  JSON only: thawing a spool file can never run code.
"""

import json

SCHEMA_VERSION = 1


class Envelope:
    """One message's envelope.

    id          queue id, set when DATA starts
    sender      reverse path without brackets; "" for <>
    recipients  forward paths, in the order accepted
    helo        the name the client gave in HELO/EHLO
    client      the client address from the connection; None when local
    protocol    SMTP, ESMTP, ESMTPS, ESMTPA or ESMTPSA (RFC 3848)
    params      MAIL parameters: SIZE (int), BODY, SMTPUTF8 (True)
    tls         TLS facts ({"version", "cipher"}) or None
    auth        the authenticated user or None
    arrival     seconds since the epoch when DATA started
    """

    FIELDS = ("id", "sender", "recipients", "helo", "client", "protocol",
              "params", "tls", "auth", "arrival")

    def __init__(self, sender="", recipients=(), helo=None, client=None,
                 protocol="SMTP", params=None, tls=None, auth=None, id=None,
                 arrival=None):
        self.id = id
        self.sender = sender
        self.recipients = list(recipients)
        self.helo = helo
        self.client = client
        self.protocol = protocol
        self.params = dict(params or {})
        self.tls = tls
        self.auth = auth
        self.arrival = arrival

    def freeze(self):
        """The envelope as one line of JSON bytes, newline included."""
        data = {"version": SCHEMA_VERSION}
        data.update((name, getattr(self, name)) for name in self.FIELDS)
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_json(cls, line):
        """Build an envelope from its frozen JSON line; ValueError if unusable."""
        data = json.loads(line)
        if not isinstance(data, dict) or not isinstance(data.get("version"), int):
            raise ValueError("not a netsmtp envelope")
        if data["version"] > SCHEMA_VERSION:
            raise ValueError("envelope schema %r is newer than this netsmtp" % data["version"])
        if not isinstance(data.get("id"), str) or not isinstance(data.get("recipients"), list):
            raise ValueError("envelope lacks id or recipients")
        return cls(**{name: data[name] for name in cls.FIELDS if name in data})

    def __repr__(self):
        return "<Envelope %s from <%s> to %d recipient(s)>" % (
            self.id, self.sender, len(self.recipients))
