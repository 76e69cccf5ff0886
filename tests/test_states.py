"""The predecessor table, checked for every verb in every state."""

import pytest

from conftest import Conversation
from netsmtp.replies import SMTPError
from netsmtp.session import Session
from netsmtp.states import PREDECESSORS, UNIMPLEMENTED, State, is_allowed

# A command sequence that leaves a fresh session in each state.
REACH = {
    State.CONNECTED: [],
    State.READY: [b"EHLO client.test"],
    State.MAIL: [b"EHLO client.test", b"MAIL FROM:<a@client.test>"],
    State.RCPT: [b"EHLO client.test", b"MAIL FROM:<a@client.test>", b"RCPT TO:<u@mx.test>"],
    State.CHUNKING: [b"EHLO client.test", b"MAIL FROM:<a@client.test>", b"RCPT TO:<u@mx.test>",
                     b"BDAT 4\r\nab\r\n"],
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
    "BDAT": b"BDAT 5 LAST\r\nbody\n",
    "RSET": b"RSET",
    "NOOP": b"NOOP",
    "QUIT": b"QUIT",
    "HELP": b"HELP",
    "VRFY": b"VRFY u@mx.test",
    "STARTTLS": b"STARTTLS",
    "AUTH": b"AUTH PLAIN",
}

# The state each verb leaves behind when it is allowed and succeeds.
AFTER = {
    "HELO": lambda s: State.READY, "EHLO": lambda s: State.READY,
    "MAIL": lambda s: State.MAIL, "RCPT": lambda s: State.RCPT,
    "DATA": lambda s: State.READY, "BDAT": lambda s: State.READY,
    "RSET": lambda s: s if s is State.CONNECTED else State.READY,
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
    assert not is_allowed("BDAT", State.MAIL) and not is_allowed("DATA", State.CHUNKING)
    assert not any(is_allowed(v, State.CHUNKING) for v in ("MAIL", "RCPT", "STARTTLS", "AUTH"))
    open_states = set(State) - {State.REFUSED}
    assert all(is_allowed(v, s) for v in ("RSET", "NOOP", "QUIT", "HELP", "EHLO") for s in open_states)
    assert [v for v in PREDECESSORS if is_allowed(v, State.REFUSED)] == ["QUIT"]


@pytest.mark.parametrize("verb,state", CASES, ids=["%s-in-%s" % (v, s.name) for v, s in CASES])
def test_verb_in_state(converse, verb, state):
    """A verb out of sequence gets 503 5.5.1 and changes nothing; in sequence it is not 503.

    BDAT's octets are sent either way: they are read and dropped before a 503.
    """
    command = COMMAND[verb] if is_allowed(verb, state) or verb == "BDAT" \
        else COMMAND[verb].split(b"\r\n")[0]
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


def test_table_is_read_only():
    """Session's table cannot be changed in place: a subclass brings its own (STYLE rule 5)."""
    assert Session.predecessors is PREDECESSORS
    with pytest.raises(TypeError):
        Session.predecessors["XFOO"] = frozenset({State.READY})


class Extended(Session):
    """Adds XFOO, allowed once a client has greeted, without touching Session."""

    predecessors = {**Session.predecessors, "XFOO": frozenset({State.READY})}

    def smtp_XFOO(self, arg):
        self.reply("250 2.0.0")


def test_subclass_adds_a_verb(converse):
    """A subclass's own table row and method make a verb; Session still refuses it."""
    extended = Conversation(converse.options, converse.spool, session_class=Extended)
    assert extended.codes([b"XFOO", b"EHLO client.test", b"XFOO", b"HELP"]) == [
        220, 503, 250, 250, 214]
    assert "XFOO" in extended([b"HELP"])[1][1][1].split()
    assert converse.codes([b"EHLO client.test", b"XFOO"]) == [220, 250, 500]
    assert "XFOO" not in PREDECESSORS and "XFOO" not in converse([b"HELP"])[1][1][1].split()


UNOFFERED = sorted(UNIMPLEMENTED)


@pytest.mark.parametrize("verb", UNOFFERED)
def test_unoffered_verb_is_502(converse, verb):
    """Each known but unoffered verb gets 502 5.5.1 in every open state."""
    for state in set(State) - {State.REFUSED}:
        replies = converse([*REACH[state], verb.encode()])
        assert replies[-1] == (502, ["502 5.5.1 %s not implemented" % verb]), state


@pytest.mark.parametrize("line", [b"EXPN staff", b"ETRN mx.test", b"TURN", b"FROB", b"NOOP"])
def test_refused_session_answers_503_to_all_but_quit(converse, line):
    """After a 554 greeting every command but QUIT gets 503 5.5.1, unoffered ones too."""
    refused = Conversation(converse.options, converse.spool, session_class=Refusing)
    assert refused([line, b"QUIT"]) == [
        (554, ["554 5.7.1 Access denied: refused"]), (503, ["503 5.5.1 Bad sequence of commands"]),
        (221, ["221 2.0.0 mx.test closing connection"])]
