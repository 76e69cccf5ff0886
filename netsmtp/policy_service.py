"""Postfix policy services (SMTPD_POLICY_README): the client and its actions.

A query is name=value lines and an empty line; the answer is action=...
and an empty line.  The client keeps one connection per session, sends
Postfix's attribute names, and bounds the answer in size and time.  Values
come from the client, so CR, LF and NUL are taken out of every value: a
value can never add an attribute.  The actions are those of Postfix's
access(5), mapped as the README says; any action netsmtp does not take is
an error, answered with --policy-default-action, never silently OK.
"""

import logging
import re
import time

from .address import AddressError, parse_path
from .policy import FIELD_NAME
from .replies import FilterReply, parse_filter_reply, printable
from .transport import open_stream

log = logging.getLogger(__name__)

MAX_ANSWER = 4096  # octets of one answer, its blank line included
ENHANCED_PREFIX = re.compile(r"([45])\.([0-9]{1,3})\.([0-9]{1,3})(?: |\Z)")
UNSAFE = str.maketrans({"\r": " ", "\n": " ", "\0": " "})


class PolicyError(Exception):
    """The service is down, slow, or answered something that is not an answer."""


class Action:
    """What a policy answer asks for: kind, and the reply or argument it carries.

    kind is one of CONTINUE, REFUSE (reply is a FilterReply), PREPEND
    (argument is the header line), HOLD, DISCARD (argument is the reason)
    or REDIRECT (argument is the address).
    """

    CONTINUE, REFUSE, PREPEND, HOLD, DISCARD, REDIRECT = (
        "continue", "refuse", "prepend", "hold", "discard", "redirect")

    def __init__(self, kind, reply=None, argument=""):
        self.kind, self.reply, self.argument = kind, reply, argument

    def __repr__(self):
        return "<Action %s %s>" % (self.kind, self.reply or self.argument)


def _refusal(code, default_enhanced, text, default_text):
    """REJECT/DEFER text may begin with its own enhanced code of the same class."""
    text = text or default_text
    match = ENHANCED_PREFIX.match(text)
    if match and match.group(1) == str(code)[0]:
        return parse_filter_reply("%d %s" % (code, text))
    return parse_filter_reply("%d %s %s" % (code, default_enhanced, text))


def parse_action(text):
    """The Action of an action= value; ValueError for one netsmtp does not take."""
    word, _, rest = text.strip().partition(" ")
    verb, rest = word.upper(), rest.strip()
    if verb in ("", "OK", "DUNNO"):
        return Action(Action.CONTINUE)
    if verb == "REJECT":
        return Action(Action.REFUSE, _refusal(550, "5.7.1", rest, "Access denied"))
    if verb in ("DEFER", "DEFER_IF_PERMIT"):
        return Action(Action.REFUSE, _refusal(450, "4.7.1", rest, "Try again later"))
    if verb[:1] in ("4", "5") and verb.isdigit():
        # An explicit reply; parse_filter_reply checks code, enhanced code and text.
        return Action(Action.REFUSE, parse_filter_reply(text.strip(), default_enhanced="7.1"))
    if verb == "PREPEND":
        name, colon, value = rest.partition(":")
        if not colon or not FIELD_NAME.match(name) or name != name.rstrip() or \
                not all(c == "\t" or c >= " " and c != "\x7f" for c in value):
            raise ValueError("PREPEND needs a header field, got %r" % printable(rest, 80))
        return Action(Action.PREPEND, argument="%s:%s" % (name, value))
    if verb in ("HOLD", "DISCARD"):
        return Action(verb.lower(), argument=printable(rest))
    if verb == "REDIRECT":
        try:
            address, params = parse_path("<%s>" % rest)
        except AddressError:
            address, params = "", True
        if not address or params:
            raise ValueError("REDIRECT needs an address, got %r" % printable(rest, 80))
        return Action(Action.REDIRECT, argument=address)
    raise ValueError("policy action %r is not one netsmtp takes" % printable(verb, 40))


def encode_query(attributes):
    """The request bytes; no value can hold CR, LF or NUL, no name "=" either."""
    lines = []
    for name, value in attributes.items():
        assert "=" not in name and name.isidentifier(), name
        value = "" if value is None else str(value)
        lines.append("%s=%s\n" % (name, value.translate(UNSAFE)))
    return ("".join(lines) + "\n").encode("utf-8", "backslashreplace")


def parse_answer(data):
    """The action= value of one answer (bytes ending in a blank line); PolicyError if none."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("answer is not UTF-8") from None
    action = None
    for line in text[:-2].split("\n"):
        name, sep, value = line.partition("=")
        if not sep or "\r" in line:
            raise PolicyError("malformed answer line %r" % printable(line, 80))
        if name == "action":
            action = value
    if action is None:
        raise PolicyError("answer has no action")
    return action


class PolicyClient:
    """One policy service: a connection kept for the session, a query at a time."""

    def __init__(self, address, timeout):
        self.address = address  # ("inet", (host, port)) or ("unix", path)
        self.timeout = timeout
        self.sock = None

    @property
    def name(self):
        kind, where = self.address
        return "unix:%s" % where if kind == "unix" else "%s:%d" % where

    def connect(self, deadline):
        return open_stream(self.address, max(0.001, deadline - time.monotonic()))

    def query(self, attributes):
        """The action= value for attributes, within the timeout; PolicyError on trouble.

        A kept connection the service has meanwhile closed is opened again
        once (Postfix's try limit of 2); any other failure closes it.
        """
        deadline = time.monotonic() + self.timeout
        request = encode_query(attributes)
        for attempt in (1, 2):
            reused = self.sock is not None
            try:
                if self.sock is None:
                    self.sock = self.connect(deadline)
                self.sock.settimeout(max(0.001, deadline - time.monotonic()))
                self.sock.sendall(request)
                return parse_answer(self.read_answer(deadline))
            except (OSError, EOFError, PolicyError) as exc:
                self.close()
                if reused and isinstance(exc, (EOFError, ConnectionError)) and attempt == 1:
                    continue
                if isinstance(exc, PolicyError):
                    raise
                raise PolicyError("%s: %s" % (type(exc).__name__, exc)) from None
        raise PolicyError("no answer")  # not reached

    def read_answer(self, deadline):
        data = bytearray()
        while not data.endswith(b"\n\n") and not data == b"\n":
            if len(data) > MAX_ANSWER:
                raise PolicyError("answer over %d octets" % MAX_ANSWER)
            left = deadline - time.monotonic()
            if left <= 0:
                raise PolicyError("timed out")
            self.sock.settimeout(left)
            chunk = self.sock.recv(MAX_ANSWER + 1 - len(data))
            if not chunk:
                raise EOFError("closed by the service")
            data += chunk
        return bytes(data)

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None


def ask(clients, attributes, default_action):
    """Ask each service in turn; the Actions to take, a refusal ending the list.

    OK and DUNNO go on to the next service, as do PREPEND, HOLD, DISCARD
    and REDIRECT, which Postfix does not treat as final either.  A failing
    service, or an action netsmtp does not take, is logged and answered with
    default_action (itself an action text, checked at start).
    """
    actions = []
    for client in clients:
        try:
            text = client.query(attributes)
        except PolicyError as exc:
            log.error("policy service %s failed (%s): using the default action %r",
                      client.name, exc, default_action)
            text = default_action
        try:
            action = parse_action(text)
        except ValueError as exc:
            log.error("policy service %s: %s; using the default action %r",
                      client.name, exc, default_action)
            action = parse_action(default_action)
        if action.kind == Action.CONTINUE:
            continue
        log.info("policy service %s: %s for %s", client.name, action,
                 printable(attributes.get("recipient") or attributes.get("sender")))
        actions.append(action)
        if action.kind == Action.REFUSE:
            break
    return actions


__all__ = ["Action", "FilterReply", "PolicyClient", "PolicyError", "ask", "parse_action"]
