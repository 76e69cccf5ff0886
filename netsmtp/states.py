"""Protocol states and the predecessor table that orders SMTP commands.

The session looks a verb up in its predecessors (by default PREDECESSORS)
before it runs the verb's method; a verb whose set does not hold the
current state gets 503 5.5.1 and changes nothing.  Verbs therefore never
check their own sequence.  The table is read-only: a Session subclass that
adds a verb extends it in a class attribute of its own.
"""

import enum
from types import MappingProxyType


class State(enum.Enum):
    """Where a session stands between commands."""

    CONNECTED = "connected"  # greeted, no HELO/EHLO yet
    READY = "ready"          # HELO/EHLO done, no transaction
    MAIL = "mail"            # MAIL FROM accepted, no recipient yet
    RCPT = "rcpt"            # at least one RCPT TO accepted
    CHUNKING = "chunking"    # BDAT chunks received, LAST not yet (RFC 3030)
    REFUSED = "refused"      # greeted with 554: only QUIT (RFC 5321 section 3.1)


ANY = frozenset(State) - {State.REFUSED}
# No transaction open: a stopping server may close such a session at once.
IDLE = frozenset({State.CONNECTED, State.READY, State.REFUSED})

# RFC 5321 section 4.1.4: HELO/EHLO may come at any time and reset the
# transaction; MAIL needs a greeting and no open transaction; DATA needs a
# recipient.  STARTTLS and AUTH are only allowed outside a transaction
# (RFC 3207 section 4, RFC 4954 section 4).  BDAT needs a recipient or an
# earlier chunk; DATA, MAIL and RCPT after a chunk are 503 (RFC 3030 section 2).
PREDECESSORS = MappingProxyType({
    "HELO": ANY,
    "EHLO": ANY,
    "MAIL": frozenset({State.READY}),
    "RCPT": frozenset({State.MAIL, State.RCPT}),
    "DATA": frozenset({State.RCPT}),
    "BDAT": frozenset({State.RCPT, State.CHUNKING}),
    "RSET": ANY,
    "NOOP": ANY,
    "QUIT": ANY | {State.REFUSED},
    "HELP": ANY,
    "VRFY": ANY,
    "STARTTLS": frozenset({State.READY}),
    "AUTH": frozenset({State.READY}),
})

# Verbs RFC 5321 and its extensions define that netsmtp does not offer; they
# get 502 5.5.1 rather than 500 5.5.2.  EXPN may be disabled (RFC 5321
# section 7.3) and TURN is obsolete and unsafe (section 4.1.1).  A verb a
# session implements (a method and a predecessor row) is served even if
# it is listed here.
UNIMPLEMENTED = frozenset({"EXPN", "TURN", "ETRN", "ATRN", "SEND", "SOML", "SAML"})


def is_allowed(verb, state, predecessors=PREDECESSORS):
    """True when verb may follow state in the predecessor table."""
    return state in predecessors.get(verb, ANY)
