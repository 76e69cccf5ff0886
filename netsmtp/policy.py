"""The overridable decisions of a session, with safe defaults.

Each check_* method accepts by returning and refuses by raising SMTPError
with the reply to send; the session turns the error into that reply and
changes nothing else.  Override them in a Session subclass.
"""

import logging
import re
import socket

from . import recipients
from .address import domain_of, in_networks, ip_of
from .recipients import ALIAS
from .replies import SMTPError, printable

log = logging.getLogger(__name__)

# Characters of a local part that route the mail on elsewhere (RFC 1123
# section 5.2.16: the %-hack; UUCP bang paths; a quoted "a@b").
ROUTING = frozenset("%!@")

# RFC 5322 section 3.6.8: a field name is printable ASCII but the colon;
# section 4.5.1 (obsolete syntax) lets spaces stand before the colon.
FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+[ \t]*\Z")


class Policy:
    """Who may connect, send and relay.  Mixed into Session.

    The defaults make no open relay: any client may send to the local
    domains; only the relay networks (and, with AUTH, authenticated users)
    may send anywhere else.  A session with no client address (a pipe into
    --stdin with no address in its environment) may relay only when
    options.relay_networks holds the word "local".

    Policy cannot run alone: its hooks read the session's options, peer, proxy
    and auth_user, which Session sets.

    Class variables that may be overridden (the bounds of the message checks):
        max_header_fields      header fields in one message
        max_header_field_size  octets of one field, its folded lines joined
        max_received           Received fields that mean a mail loop
    """

    max_header_fields = 1000
    max_header_field_size = 64 * 1024
    max_received = 100  # RFC 5321 section 6.3 suggests 100 hops

    # The recipient table this session uses, looked up at its first RCPT.
    recipient_table = None
    recipient_table_checked = False

    def check_client(self, peer):
        """Called once before the greeting with the client address (or None).

        Raise SMTPError to refuse the client: after a 554 (e.g. "554
        5.7.1") every command but QUIT gets 503 (RFC 5321 section 3.1); a
        421 closes the connection at once.
        """

    def check_helo(self, name):
        """Called with the HELO/EHLO argument; raise SMTPError to refuse it.

        With options.helo_verify the name must be in options.helo_allowed,
        or be an address literal of the client, or resolve to the client.
        """
        if not self.options.helo_verify or self.peer is None:
            return
        if name.lower().rstrip(".") in (self.options.helo_allowed or ()):
            return
        client = ip_of(self.peer)
        if name.startswith("["):
            # RFC 5321 section 4.1.3: [192.0.2.1] or [IPv6:2001:db8::1].
            literal = name[1:-1]
            literal = literal[5:] if literal[:5].lower() == "ipv6:" else literal
            if name.endswith("]") and client is not None and ip_of(literal) == client:
                return
            raise SMTPError("554 5.7.1", "HELO address literal is not your address")
        try:
            found = {ip_of(info[4][0]) for info in socket.getaddrinfo(name, None)}
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_AGAIN:
                raise SMTPError("450 4.7.1", "cannot resolve the HELO name now") from None
            found = set()
        except UnicodeError:  # the idna codec: an empty or over-long label
            found = set()
        if client is None or client not in found:
            raise SMTPError("554 5.7.1", "HELO name does not resolve to your address")

    def check_mail_from(self, address, params):
        """Called with the reverse path ("" for <>) and the MAIL parameters."""

    def check_rcpt_to(self, address, params):
        """Called with each forward path; returns None or replacement addresses.

        Returning a list delivers to those addresses instead (an alias or a
        redirect).  The default refuses relaying with 550 5.7.1, and for the
        local domains runs resolve_recipient(): the recipient table and its
        aliases, the Maildir check and, with verify_recipients, the
        smarthost's answer.  An address that does not exist gets 550 5.1.1
        (450 4.1.1 when the smarthost cannot tell now).  An override that
        calls super() keeps all of these and adds its own.
        """
        domain = domain_of(address)
        if domain and domain not in self.options.local_domains:
            if not self.may_relay():
                raise SMTPError("550 5.7.1", address)
            return None
        if domain and ROUTING.intersection(address.rpartition("@")[0]) and not self.may_relay():
            # The %-hack, bang paths and a quoted @ route mail on at a next
            # hop that trusts netsmtp: relay attempts, refused as Postfix's
            # allow_untrusted_routing = no does (security review 2, M5).
            raise SMTPError("550 5.7.1", address)
        resolution = self.resolve_recipient(address)
        if not resolution.accepted:
            log.info("%s: <%s> refused: %s", printable(self.peer or "local"),
                     printable(address), printable(resolution.reason))
            raise SMTPError(resolution.reply, address)
        return list(resolution.targets) if resolution.kind == ALIAS else None

    def resolve_recipient(self, address):
        """The netsmtp.recipients.Resolution of an address at a local domain.

        The recipient file is checked for a change once per session.
        """
        if not self.recipient_table_checked:
            self.recipient_table = recipients.current(self.options)
            self.recipient_table_checked = True
        verify = None
        if self.options.verify_recipients:
            from .verify import verifier
            verify = verifier(self.options).verify
        return recipients.resolve(self.options, address, self.recipient_table, verify)

    def check_message(self, envelope, headers):
        """Called after the final dot, before the 250.

        headers is [(name, value)] of the header section (name is None for a
        line that is not a header field).  Raise SMTPError to refuse the
        message; nothing is then kept.  The default runs check_headers and
        check_loop.
        """
        self.check_headers(headers)
        self.check_loop(headers)

    def check_headers(self, headers):
        """The header section parses (RFC 5322 section 2.2) and is bounded.

        A message whose first line is no header field has no header section
        (all body), and is let through; after a first field, every line up
        to the blank line must be a field or its continuation.
        """
        if not headers or headers[0][0] is None or not FIELD_NAME.match(headers[0][0]):
            return
        if len(headers) > self.max_header_fields:
            raise SMTPError("554 5.6.0", "over %d header fields" % self.max_header_fields)
        for name, value in headers:
            if name is None or not FIELD_NAME.match(name):
                raise SMTPError("554 5.6.0", "malformed header section")
            if len(name) + len(value) > self.max_header_field_size:
                raise SMTPError("554 5.6.0", "header field %s too long" % name[:64])

    def check_loop(self, headers):
        """Refuse a message that already passed too many hops (RFC 5321 section 6.3)."""
        hops = sum(1 for name, _ in headers if name and name.strip().lower() == "received")
        if hops >= self.max_received:
            raise SMTPError("554 5.4.6", hops)

    def may_relay(self):
        """True when this client may send to any domain.

        A PROXY v2 LOCAL session (a load balancer's health check) has only
        the proxy's own address, which must not lend it the proxy's rights.
        """
        if self.proxy is not None and self.proxy.local:
            return False
        return self.auth_user is not None or in_networks(self.peer, self.options.relay_networks)

