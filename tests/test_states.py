"""The predecessor table, checked for every verb in every state."""

import pytest

from conftest import Conversation
from netsmtp.replies import SMTPError
from netsmtp.session import Session
from netsmtp.states import PREDECESSORS, State, is_allowed

# A command sequence that leaves a fresh session in each state.
REACH = {
    State.CONNECTED: [],
    State.READY: [b"EHLO client.test"],
    State.MAIL: [b"EHLO client.test", b"MAIL FROM:<a@client.test>"],
    State.RCPT: [b"EHLO client.test", b"MAIL FROM:<a@client.test>", b"RCPT TO:<u@mx.test>"],
    State.REFUSED: [],  # reached by the refusing session below
}


class Refusing(Session):
    """Greets every client with 554, which leaves it in State.REFUSED."""

    def check_client(self, peer):
        raise SMTPError("554 5.7.1", "refused")

# A well-formed use of each verb; DATA carries its message.
COMMAND = {
    "HELO": b"HELO client.test",
    "EHLO": b"EHLO client.test",
    "MAIL": b"MAIL FROM:<b@client.test>",
    "RCPT": b"RCPT TO:<v@mx.test>",
    "DATA": b"DATA\r\nSubject: t\r\n\r\nbody\r\n.\r\n",
    "RSET": b"RSET",
    "NOOP": b"NOOP",
    "QUIT": b"QUIT",
    "HELP": b"HELP",
    "VRFY": b"VRFY u@mx.test",
    "EXPN": b"EXPN list@mx.test",
    "TURN": b"TURN",
    "STARTTLS": b"STARTTLS",
    "AUTH": b"AUTH PLAIN",
}

# The state each verb leaves behind when it is allowed and succeeds.
AFTER = {
    "HELO": lambda s: State.READY, "EHLO": lambda s: State.READY,
    "MAIL": lambda s: State.MAIL, "RCPT": lambda s: State.RCPT,
    "DATA": lambda s: State.READY, "RSET": lambda s: s if s is State.CONNECTED else State.READY,
}

CASES = [(verb, state) for verb in COMMAND for state in State]


def test_every_verb_has_a_row():
    """The table names every verb the session implements, and only those."""
    assert set(PREDECESSORS) == set(COMMAND)
    for verb, states in PREDECESSORS.items():
        assert states and states <= set(State), verb


def test_table_orders_the_transaction():
    """MAIL needs a greeting, RCPT a sender, DATA a recipient (RFC 5321 4.1.4)."""
    assert not is_allowed("MAIL", State.CONNECTED)
    assert not is_allowed("MAIL", State.MAIL)
    assert not is_allowed("RCPT", State.READY)
    assert not is_allowed("DATA", State.MAIL)
    assert is_allowed("DATA", State.RCPT)
    open_states = set(State) - {State.REFUSED}
    assert all(is_allowed(v, s) for v in ("RSET", "NOOP", "QUIT", "HELP", "EHLO") for s in open_states)
    assert [v for v in PREDECESSORS if is_allowed(v, State.REFUSED)] == ["QUIT"]


@pytest.mark.parametrize("verb,state", CASES, ids=["%s-in-%s" % (v, s.name) for v, s in CASES])
def test_verb_in_state(converse, verb, state):
    """A verb out of sequence gets 503 5.5.1 and changes nothing; in sequence it is not 503."""
    command = COMMAND[verb] if is_allowed(verb, state) else COMMAND[verb].split(b"\r\n")[0]
    if state is State.REFUSED:
        converse = Conversation(converse.options, converse.spool, session_class=Refusing)
    replies = converse([*REACH[state], command])
    prefix = [554 if state is State.REFUSED else 220] + [250] * len(REACH[state])
    assert [code for code, _ in replies[:len(prefix)]] == prefix
    answer = replies[len(prefix):]
    if verb == "DATA" and is_allowed(verb, state):
        assert [code for code, _ in answer] == [354, 250]
    elif is_allowed(verb, state):
        assert len(answer) == 1 and answer[0][0] != 503, answer
    else:
        assert answer == [(503, ["503 5.5.1 Bad sequence of commands"])]
        assert converse.session.state is state
    if is_allowed(verb, state) and verb in AFTER:
        assert converse.session.state is AFTER[verb](state)
