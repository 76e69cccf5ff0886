"""The README's examples run, and its reference names every option."""

import base64
import os
import re
import tomllib

from conftest import ROOT, Conversation, spooled
from netsmtp.envelope import Envelope
from netsmtp.options import SPEC, Options

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def blocks(kind):
    return re.findall(r"```%s\n(.*?)```" % kind, README, re.S)


def test_policy_example_works(options, spool):
    """The subclassing example refuses, adds a recipient and accepts as its text says."""
    namespace = {"__name__": "readme_example"}
    exec(compile(blocks("python")[0], "README.md", "exec"), namespace)
    converse = Conversation(options.replace(local_domains="example.com"), spool,
                            session_class=namespace["Gateway"])
    hello = [b"EHLO c.test"]
    assert converse.codes(hello + [b"MAIL FROM:<x@SPAM.example>"])[-1] == 550
    converse(hello + [b"MAIL FROM:<a@c.test>", b"RCPT TO:<sales@example.com>",
                      b"DATA", b"Subject: hi\r\n\r\nx\r\n."])
    assert converse.session.messages == 1 and len(spooled(spool)) == 1
    envelope = Envelope.thaw(os.path.join(spool.path, spooled(spool)[0]))
    assert envelope.recipients == ["sales@example.com", "archive@example.com"]
    # super() still refuses relaying for the subclass.
    assert converse.codes(hello + [b"MAIL FROM:<a@c.test>", b"RCPT TO:<u@far.test>"])[-1] == 550
    assert converse.codes(hello + [b"MAIL FROM:<a@c.test>", b"RCPT TO:<u@example.com>",
                                   b"DATA", b"x\r\n."])[-1] == 554


def test_verb_and_mechanism_example_works(options, spool, tmp_path):
    """The example adds a verb and an AUTH mechanism as the README says; Session is unchanged."""
    from netsmtp.auth import hash_password
    from netsmtp.session import Session
    namespace = {"__name__": "readme_example"}
    exec(compile(blocks("python")[1], "README.md", "exec"), namespace)
    users = tmp_path / "users"
    users.write_text("alice:%s\n" % hash_password("pw"))
    options = options.replace(auth_file=str(users), auth_plaintext=True, auth_fail_delay=0)
    office = Conversation(options, spool, session_class=namespace["Office"])
    pair = base64.b64encode(b"alice:pw")
    replies = office([b"XSTAT", b"EHLO c.test", b"XSTAT", b"AUTH X-PAIR " + pair])
    assert [code for code, _ in replies] == [220, 503, 250, 250, 235]
    assert "AUTH PLAIN LOGIN X-PAIR" in [line[4:] for line in replies[2][1]]
    assert office.session.auth_user == "alice"
    assert office.codes([b"EHLO c.test", b"AUTH X-PAIR", base64.b64encode(b"alice:no")]) == [
        220, 250, 334, 535]
    plain = Conversation(options, spool)
    assert plain.codes([b"EHLO c.test", b"XSTAT", b"AUTH X-PAIR " + pair]) == [220, 250, 500, 504]
    assert "XSTAT" not in Session.predecessors


def test_toml_example_is_valid():
    """The configuration example parses into Options."""
    for text in blocks("toml"):
        Options(**{k.replace("-", "_"): v for k, v in tomllib.loads(text).items()})


def test_every_option_is_documented():
    """Each flag of the options table appears in the README."""
    missing = [opt.flag for opt in SPEC.values() if "`%s" % opt.flag not in README]
    assert missing == []


def test_reading_guide_names_every_module():
    """The "Reading the code" table names each module of netsmtp/ that exists, and only those."""
    section = README.split("## Reading the code", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| `")]
    named = {name for line in table for name in re.findall(r"`(\w+)\.py`", line.split(" | ")[0])}
    modules = {name[:-3] for name in os.listdir(os.path.join(ROOT, "netsmtp"))
               if name.endswith(".py") and not name.startswith("__")}
    assert named == modules
