"""The overridable decisions of a session, with safe defaults.

Each check_* method accepts by returning and refuses by raising SMTPError
with the reply to send; the session turns the error into that reply and
changes nothing else.  Override them in a Session subclass.
"""

import ipaddress

from .address import domain_of
from .replies import SMTPError


class Policy:
    """Who may connect, send and relay.  Mixed into Session.

    The defaults make no open relay: any client may send to the local
    domains; only the relay networks (and, with AUTH, authenticated users)
    may send anywhere else.  A session with no client address (a local pipe
    into --stdin) is trusted like the loopback.
    """

    def check_client(self, peer):
        """Called once before the greeting with the client address (or None).

        Raise SMTPError (e.g. "554 5.7.1") to refuse the connection.
        """

    def check_helo(self, name):
        """Called with the HELO/EHLO argument; raise SMTPError to refuse it."""

    def check_mail_from(self, address, params):
        """Called with the reverse path ("" for <>) and the MAIL parameters."""

    def check_rcpt_to(self, address, params):
        """Called with each forward path; returns None or replacement addresses.

        Returning a list delivers to those addresses instead (an alias or a
        redirect).  The default refuses relaying with 550 5.7.1.
        """
        domain = domain_of(address)
        if domain and domain not in self.options.local_domains and not self.may_relay():
            raise SMTPError("550 5.7.1", address)
        return None

    def check_message(self, envelope, headers):
        """Called after the final dot, before the 250.

        headers is [(name, value)] of the header section (name is None for a
        line that is not a header field).  Raise SMTPError to refuse the
        message; nothing is then kept.
        """

    def may_relay(self):
        """True when this client may send to any domain."""
        if self.peer is None or self.auth_user is not None:
            return True
        try:
            address = ipaddress.ip_address(self.peer.partition("%")[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in net for net in self.options.relay_networks)
