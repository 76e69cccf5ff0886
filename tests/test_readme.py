"""The README's examples run, and its reference names every option."""

import os
import re
import tomllib

from conftest import ROOT, Conversation, spooled
from netsmtp.options import SPEC, Options

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def blocks(kind):
    return re.findall(r"```%s\n(.*?)```" % kind, README, re.S)


def test_policy_example_works(options, spool):
    """The subclassing example refuses, rewrites and accepts as its text says."""
    namespace = {"__name__": "readme_example"}
    exec(compile(blocks("python")[0], "README.md", "exec"), namespace)
    converse = Conversation(options.replace(local_domains="example.com"), spool,
                            session_class=namespace["Gateway"])
    hello = [b"EHLO c.test"]
    assert converse.codes(hello + [b"MAIL FROM:<x@SPAM.example>"])[-1] == 550
    converse(hello + [b"MAIL FROM:<a@c.test>", b"RCPT TO:<sales@example.com>",
                      b"DATA", b"Subject: hi\r\n\r\nx\r\n."])
    assert converse.session.messages == 1 and len(spooled(spool)) == 1
    with open(os.path.join(spool.path, spooled(spool)[0]), "rb") as f:
        assert b'"recipients":["ann@example.com","bob@example.com"]' in f.readline()
    assert converse.codes(hello + [b"MAIL FROM:<a@c.test>", b"RCPT TO:<u@example.com>",
                                   b"DATA", b"x\r\n."])[-1] == 554


def test_toml_example_is_valid():
    """The configuration example parses into Options."""
    for text in blocks("toml"):
        Options(**{k.replace("-", "_"): v for k, v in tomllib.loads(text).items()})


def test_every_option_is_documented():
    """Each flag of the options table appears in the README."""
    missing = [opt.flag for opt in SPEC.values() if "`%s" % opt.flag not in README]
    assert missing == []
