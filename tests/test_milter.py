"""Milters (Sendmail milter protocol v6): netsmtp's MTA side against Sendmail's libmilter
(pymilter), Debian's opendkim, and a scripted milter for what real ones never send."""

import json
import os
import socket
import struct
import subprocess
import threading

import pytest
from conftest import IN_CI, ROOT, Conversation, free_port, make_options, need_tool, spooled, wait_for

from netsmtp.envelope import Envelope

SYSTEM_PYTHON = "/usr/bin/python3"
PEER = os.path.join(ROOT, "tests", "milters", "pymilter_peer.py")


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def need_pymilter():
    """pymilter is Debian's python3-milter, for Debian's own python3."""
    found = os.path.exists(SYSTEM_PYTHON) and subprocess.run(
        [SYSTEM_PYTHON, "-c", "import Milter"], capture_output=True).returncode == 0
    if not found:
        if IN_CI:
            pytest.fail("python3-milter is not installed; .ci/run must install it")
        pytest.skip("python3-milter is not installed (apt-get install python3-milter)")


@pytest.fixture
def pymilter(tmp_path):
    """The pymilter peer on a free port: (address for --milter, events())."""
    need_pymilter()
    port = free_port()
    events_file = tmp_path / "events.jsonl"
    proc = subprocess.Popen([SYSTEM_PYTHON, PEER, "inet:%d@127.0.0.1" % port, str(events_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: listening(port) or proc.poll() is not None, what="pymilter")
    assert proc.poll() is None, proc.stderr.read().decode()

    def events():
        if not events_file.exists():
            return []
        return [json.loads(line) for line in events_file.read_text().splitlines()]
    yield "inet:127.0.0.1:%d" % port, events
    proc.kill()  # libmilter's own stop waits seconds for its threads; nothing is kept
    proc.wait(10)


def converse_with(tmp_path, spool, **options):
    return Conversation(make_options(tmp_path, **options), spool, peer="127.0.0.1")


MESSAGE = (b"From: a@example.test\r\nSubject: old subject\r\nX-Remove: me\r\n"
           b"Subject: second\r\n\r\nold body\r\n.")


def message(sender, *recipients, text=MESSAGE):
    return [b"EHLO client.test", b"MAIL FROM:<%s>" % sender.encode(),
            *[b"RCPT TO:<%s>" % r.encode() for r in recipients], b"DATA", text, b"QUIT"]


def entry(spool):
    [name] = spooled(spool)
    envelope = Envelope.thaw(os.path.join(spool.path, name))
    with envelope.open() as f:
        return envelope, f.read()


def without_trace(text):
    """The message after netsmtp's Received header (its first line and continuations)."""
    assert text.startswith(b"Received: ")
    lines = text.split(b"\r\n")
    first = next(i for i, line in enumerate(lines[1:], 1) if line[:1] != b"\t")
    return b"\r\n".join(lines[first:])


def test_pymilter_sees_every_stage_with_its_macros(pymilter, tmp_path, spool):
    """connect (family, address), HELO, MAIL, RCPT, headers, body and end of message
    reach libmilter, each with the macros milters rely on."""
    address, events = pymilter
    converse = converse_with(tmp_path, spool, milters=address)
    assert converse.codes(message("plain@example.test", "u@example.test"))[-2] == 250
    seen = {e["event"]: e for e in wait_for(lambda: len(events()) >= 6 and events(),
                                            what="events")}
    assert seen["connect"]["address"] == "127.0.0.1"
    assert seen["connect"]["macros"]["j"] == "mx.test"
    assert seen["connect"]["macros"]["{client_addr}"] == "127.0.0.1"
    assert seen["connect"]["macros"]["{daemon_name}"] == "netsmtp"
    assert seen["helo"]["name"] == "client.test"
    assert seen["mail"]["sender"] == "<plain@example.test>"
    assert seen["mail"]["macros"]["{mail_addr}"] == "plain@example.test"
    assert seen["rcpt"]["macros"]["{rcpt_addr}"] == "u@example.test"
    assert seen["eoh"]["headers"][1] == ["Subject", "old subject"]
    # The Received header netsmtp adds is not shown to milters, as in Postfix.
    assert all(name != "Received" for name, _ in seen["eoh"]["headers"])
    assert seen["eom"]["body"] == "old body\r\n"
    queue_id = seen["eom"]["macros"]["i"]
    envelope, text = entry(spool)
    assert queue_id == envelope.id and text.startswith(b"Received: ")


def test_rcpt_reject_and_replycode(pymilter, tmp_path, spool):
    """A reject at RCPT is 550 5.7.1 for that recipient only; a reply code is kept."""
    address, _ = pymilter
    converse = converse_with(tmp_path, spool, milters=address)
    replies = converse(message("plain@example.test", "reject@example.test",
                               "code@example.test", "ok@example.test"))
    assert [lines[0] for _, lines in replies[3:6]] == [
        "550 5.7.1 Command rejected", "553 5.1.2 no such domain here",
        "250 2.1.5 Recipient <ok@example.test> OK"]
    assert replies[-2][0] == 250
    assert entry(spool)[0].recipients == ["ok@example.test"]


def test_tempfail_at_mail(pymilter, tmp_path, spool):
    address, _ = pymilter
    converse = converse_with(tmp_path, spool, milters=address)
    replies = converse(message("tempfail-mail@example.test", "u@example.test"))
    assert replies[2][1] == ["451 4.7.1 Service unavailable - try again later"]


@pytest.mark.parametrize("sender, reply", [
    ("replycode@example.test", "554 5.7.1 go away"),
    ("reject@example.test", "550 5.7.1 Command rejected"),
    ("tempfail@example.test", "451 4.7.1 Service unavailable - try again later"),
])
def test_refusal_at_end_of_message_leaves_nothing(pymilter, tmp_path, spool, sender, reply):
    """The milter's refusal is the reply to the final dot; nothing is spooled."""
    address, _ = pymilter
    converse = converse_with(tmp_path, spool, milters=address)
    replies = converse(message(sender, "u@example.test"))
    assert replies[-2][1] == [reply]
    assert spooled(spool) == [] and os.listdir(spool.tmp) == []


def test_modifications_are_in_the_spooled_message(pymilter, tmp_path, spool):
    """Added, inserted, changed and deleted headers and a body replaced in three chunks
    (LF made CRLF) are what the spool holds, committed before the 250."""
    address, _ = pymilter
    converse = converse_with(tmp_path, spool, milters=address)
    assert converse.codes(message("modify@example.test", "u@example.test"))[-2] == 250
    _, text = entry(spool)
    assert without_trace(text) == (
        b"X-First: top\r\nFrom: a@example.test\r\nSubject: new subject\r\n"
        b"Subject: second\r\nX-Test: 1\r\n\r\n"
        b"new body line 1\r\nnew body line 2\r\nlast line\r\n")


def test_envelope_changes(pymilter, tmp_path, spool):
    """Add and delete recipient, change sender: the spooled envelope has them."""
    address, _ = pymilter
    converse = converse_with(tmp_path, spool, milters=address)
    assert converse.codes(message("envelope@example.test", "gone@example.test",
                                  "kept@example.test"))[-2] == 250
    envelope, _ = entry(spool)
    assert envelope.sender == "changed@example.test"
    assert envelope.recipients == ["kept@example.test", "added@example.test"]


@pytest.mark.parametrize("sender", ["discard@example.test", "discard-mail@example.test"])
def test_discard_answers_250_and_keeps_nothing(pymilter, tmp_path, spool, sender):
    """A discard at end of message, or already at MAIL: 250, and nothing kept."""
    address, _ = pymilter
    converse = converse_with(tmp_path, spool, milters=address)
    replies = converse(message(sender, "u@example.test"))
    assert [code for code, _ in replies[2:-1]] == [250, 250, 354, 250]
    assert spooled(spool) == []


def test_quarantine_holds_the_message(pymilter, tmp_path, spool):
    """Quarantine: the client gets 250; the entry is held (netsmtp-queue --release)."""
    address, _ = pymilter
    converse = converse_with(tmp_path, spool, milters=address)
    assert converse.codes(message("quarantine@example.test", "u@example.test"))[-2] == 250
    envelope, _ = entry(spool)
    assert envelope.held is True


def test_a_header_that_would_change_the_structure_is_refused(pymilter, tmp_path, spool):
    """A milter's "x\\n\\nbody" header value never reaches the spool."""
    address, _ = pymilter
    converse = converse_with(tmp_path, spool, milters=address)
    replies = converse(message("badheader@example.test", "u@example.test"))
    assert replies[-2][0] == 451
    assert spooled(spool) == []


def test_rset_aborts_and_the_next_mail_is_clean(pymilter, tmp_path, spool):
    """RSET after MAIL sends an abort; the next transaction gets its own MAIL and EOM."""
    address, events = pymilter
    converse = converse_with(tmp_path, spool, milters=address)
    converse([b"EHLO client.test", b"MAIL FROM:<first@example.test>", b"RCPT TO:<u@example.test>",
              b"RSET", *message("second@example.test", "v@example.test")[1:]])
    names = [e["event"] for e in wait_for(lambda: any(e["event"] == "eom" for e in events())
                                          and events(), what="eom")]
    assert names.index("abort") > names.index("mail")
    mails = [e["sender"] for e in events() if e["event"] == "mail"]
    assert mails == ["<first@example.test>", "<second@example.test>"]
    assert entry(spool)[0].sender == "second@example.test"


@pytest.mark.parametrize("default, code", [("tempfail", 451), ("reject", 550), ("accept", 250)])
def test_unreachable_milter_gets_the_default_action(tmp_path, spool, default, code):
    port = free_port()
    converse = converse_with(tmp_path, spool, milters="inet:127.0.0.1:%d" % port,
                             milter_default_action=default)
    replies = converse(message("a@example.test", "u@example.test"))
    assert replies[2][0] == code
    assert (spooled(spool) != []) == (default == "accept")


class ScriptedMilter:
    """Answers negotiation properly, then every later packet with the bytes given (at end
    of message, eom: bytes, or a function given the connection)."""

    def __init__(self, answer, negotiate=None, eom=None):
        self.answer, self.negotiate, self.eom = answer, negotiate, eom
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            try:
                while True:
                    head = conn.recv(4, socket.MSG_WAITALL)
                    if len(head) < 4:
                        return
                    data = conn.recv(struct.unpack("!I", head)[0], socket.MSG_WAITALL)
                    if data[:1] == b"O":
                        conn.sendall(self.negotiate or struct.pack("!IcIII", 13, b"O", 6, 0x1FF, 0))
                    elif data[:1] == b"E" and callable(self.eom):
                        self.eom(conn)
                    elif data[:1] == b"E" and self.eom is not None:
                        conn.sendall(self.eom)
                    elif data[:1] not in (b"D", b"A", b"Q"):
                        conn.sendall(self.answer)
            except OSError:
                return

    def close(self):
        self.listener.close()


def reply_packet(command, data=b""):
    return struct.pack("!I", len(data) + 1) + command + data


@pytest.mark.parametrize("answer, negotiate", [
    (reply_packet(b"y", b"250 ok\0"), None),            # a 2xx reply code is no refusal
    (reply_packet(b"y", b"550 4.7.1 mixed\0"), None),   # class mismatch
    (reply_packet(b"y", b"550 5.7.1 a\r\n250 b\0"), None),
    (b"UNKNOWN COMMAND\n", None),                       # clamd's port: length 0x554e4b4e
    (struct.pack("!I", 0), None),                       # length 0
    (reply_packet(b"h", b"X-A\0b\0"), None),            # a modification before EOM
    (reply_packet(b"c"), struct.pack("!IcIII", 13, b"O", 7, 0, 0)),         # version 7
    (reply_packet(b"c"), struct.pack("!IcIII", 13, b"O", 6, 0x200, 0)),     # action not offered
], ids=["2xx", "class", "multiline-2xx", "text", "zero", "early-mod", "v7", "action"])
def test_a_milter_breaking_the_protocol_gets_the_default_action(tmp_path, spool, answer,
                                                                 negotiate):
    """Invalid replies, garbage frames and bad negotiations: never an invalid reply,
    never a 250 the milter made up; the default action (tempfail) instead."""
    milter = ScriptedMilter(answer, negotiate)
    try:
        converse = converse_with(tmp_path, spool, milters=milter.address, milter_timeout=5)
        replies = converse(message("a@example.test", "u@example.test"))
    finally:
        milter.close()
    assert replies[2][1] == ["451 4.7.1 Service unavailable - try again later"]
    assert spooled(spool) == []


@pytest.mark.parametrize("text, reply", [
    (b"554 go away", "554 5.7.1 go away"),
    (b"421 closing", "421 4.7.1 closing"),
], ids=["5xx", "4xx"])
def test_a_reply_code_without_an_enhanced_code_gets_one(tmp_path, spool, text, reply):
    """libmilter's smfi_setreply with no xcode sends "554 go away": a valid reply, taken
    as Postfix takes it (not a broken milter), with X.7.1 added as netsmtp's replies
    all carry an enhanced code."""
    milter = ScriptedMilter(reply_packet(b"y", text + b"\0"))
    try:
        converse = converse_with(tmp_path, spool, milters=milter.address, milter_timeout=5)
        replies = converse(message("a@example.test", "u@example.test"))
    finally:
        milter.close()
    assert replies[0][1] == [reply]


ACCEPT = reply_packet(b"a")


@pytest.mark.parametrize("eom", [
    reply_packet(b"h", b"X-A\0" + b"v" * 60000 + b"\0") * 20 + ACCEPT,   # over 1 MiB of changes
    reply_packet(b"h", b"X-Evil\0x\r\nInjected: 1\0") + ACCEPT,        # a fold without white space
    reply_packet(b"h", b"X Bad\0x\0") + ACCEPT,                          # not a field name
    reply_packet(b"b", b"a\0b\r\n") + ACCEPT,                             # NUL in the body
    reply_packet(b"b", b"x" * 1200 + b"\n") + ACCEPT,                     # a 1200-octet line
    reply_packet(b"b", b"a\rb\n") + ACCEPT,                               # a bare CR
    reply_packet(b"b", b"x" * 900 + b"\n") * 40 + ACCEPT,                 # over --max-size
], ids=["edits", "fold", "name", "nul", "long-line", "bare-cr", "too-big"])
def test_unsafe_modifications_get_the_default_action(tmp_path, spool, eom):
    """Changes that could alter the message's structure or grow it without bound are
    refused: the default action, nothing spooled."""
    milter = ScriptedMilter(reply_packet(b"c"), eom=eom)
    try:
        converse = converse_with(tmp_path, spool, milters=milter.address, max_size=30000)
        replies = converse(message("a@example.test", "u@example.test"))
    finally:
        milter.close()
    assert replies[-2][1] == ["451 4.7.1 Service unavailable - try again later"]
    assert spooled(spool) == []


def test_change_header_index_zero_is_the_first(tmp_path, spool):
    """SMFIR_CHGHEADER index 0 changes the first field of that name, as Postfix and
    Sendmail take it; it adds no second field."""
    milter = ScriptedMilter(reply_packet(b"c"), eom=reply_packet(
        b"m", struct.pack("!I", 0) + b"Subject\0changed\0") + ACCEPT)
    try:
        converse = converse_with(tmp_path, spool, milters=milter.address)
        assert converse.codes(message("a@example.test", "u@example.test"))[-2] == 250
    finally:
        milter.close()
    _, text = entry(spool)
    assert b"\r\nSubject: changed\r\nX-Remove: me\r\nSubject: second\r\n" in text
    assert text.count(b"Subject:") == 2


def test_a_milter_dripping_changes_is_cut_off(tmp_path, spool, monkeypatch):
    """Each packet within --milter-timeout is not enough: the whole end of message is
    bounded too (Postfix's content timeout), whatever the milter sends meanwhile."""
    import time

    import netsmtp.milter
    monkeypatch.setattr(netsmtp.milter, "MAX_EOM_SECONDS", 0.5)

    def drip(conn):
        for _ in range(30):  # 3 s of changes, each well within the timeout
            conn.sendall(reply_packet(b"h", b"X-Drip\0x\0"))
            time.sleep(0.1)
        conn.sendall(ACCEPT)
    milter = ScriptedMilter(reply_packet(b"c"), eom=drip)
    try:
        converse = converse_with(tmp_path, spool, milters=milter.address, milter_timeout=5)
        replies = converse(message("a@example.test", "u@example.test"))
    finally:
        milter.close()
    assert replies[-2][1] == ["451 4.7.1 Service unavailable - try again later"]
    assert spooled(spool) == []


def test_a_silent_milter_times_out(tmp_path, spool):
    milter = ScriptedMilter(b"")  # negotiates, then never answers
    try:
        converse = converse_with(tmp_path, spool, milters=milter.address, milter_timeout=0.5)
        replies = converse(message("a@example.test", "u@example.test"))
    finally:
        milter.close()
    assert replies[2][0] == 451


def test_milters_through_the_command_line(pymilter, server_factory):
    """--milter twice on the daemon's command line: both applied, in order."""
    import smtplib
    address, events = pymilter
    server = server_factory("--milter", address, "--milter", address)
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.ehlo("client.test")
        client.mail("plain@example.test")
        assert client.rcpt("reject@example.test")[0] == 550
        assert client.rcpt("ok@example.test")[0] == 250
    wait_for(lambda: sum(e["event"] == "rcpt" for e in events()) >= 3, what="rcpt events")


def need_system_module(module, package):
    found = os.path.exists(SYSTEM_PYTHON) and subprocess.run(
        [SYSTEM_PYTHON, "-c", "import " + module], capture_output=True).returncode == 0
    if not found:
        if IN_CI:
            pytest.fail("%s is not installed; .ci/run must install it" % package)
        pytest.skip("%s is not installed (apt-get install %s)" % (package, package))


def test_opendkim_signs_and_dkimpy_verifies(tmp_path, spool):
    """Debian's opendkim signs a message from 127.0.0.1 (an InternalHost: the connect
    stage's family and address are right), and dkimpy verifies the spooled message with
    opendkim-genkey's public key, offline; a changed body then fails to verify."""
    opendkim, genkey = need_tool("opendkim"), need_tool("opendkim-genkey")
    need_system_module("dkim", "python3-dkim")
    keys = tmp_path / "keys"
    keys.mkdir()
    subprocess.run([genkey, "-b", "2048", "-d", "example.test", "-s", "t1", "-D", str(keys)],
                   check=True, timeout=60)
    port = free_port()
    config = tmp_path / "opendkim.conf"
    config.write_text(
        "Mode s\nDomain example.test\nSelector t1\nKeyFile %s\nSocket inet:%d@127.0.0.1\n"
        "Canonicalization relaxed/simple\nInternalHosts 127.0.0.1\nRequireSafeKeys no\n"
        "Background no\nSyslog no\nPidFile %s\n" % (keys / "t1.private", port, tmp_path / "pid"))
    proc = subprocess.Popen([opendkim, "-f", "-x", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, what="opendkim")
        assert proc.poll() is None, proc.stderr.read().decode()
        converse = converse_with(tmp_path, spool, milters="inet:%d@127.0.0.1" % port)
        text = (b"From: a@example.test\r\nTo: u@example.test\r\nSubject: signed\r\n"
                b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n\r\nhello, signed world\r\n.")
        assert converse.codes(message("a@example.test", "u@example.test", text=text))[-2] == 250
    finally:
        proc.terminate()
        proc.wait(10)
    _, spooled_text = entry(spool)
    assert b"\r\nDKIM-Signature: v=1; a=rsa-sha256;" in spooled_text
    signed = tmp_path / "signed.eml"
    signed.write_bytes(spooled_text)
    verify = [SYSTEM_PYTHON, os.path.join(ROOT, "tests", "milters", "dkim_verify.py"),
              str(signed), str(keys / "t1.txt")]
    assert subprocess.run(verify, timeout=60).returncode == 0
    signed.write_bytes(spooled_text.replace(b"signed world", b"forged world"))
    assert subprocess.run(verify, timeout=60).returncode == 1


def test_a_bdat_message_is_filtered_like_data(pymilter, tmp_path, spool):
    """CHUNKING (RFC 3030): the milters see one message and their changes are spooled."""
    address, _ = pymilter
    converse = converse_with(tmp_path, spool, milters=address)
    body = MESSAGE[:-1]  # BDAT has no final dot
    replies = converse([b"EHLO client.test", b"MAIL FROM:<modify@example.test>",
                        b"RCPT TO:<u@example.test>",
                        b"BDAT %d LAST\r\n%s" % (len(body), body), b"QUIT"])
    assert replies[-2][0] == 250
    assert b"Subject: new subject\r\n" in entry(spool)[1]
    assert entry(spool)[1].endswith(b"\r\n\r\nnew body line 1\r\nnew body line 2\r\nlast line\r\n")


@pytest.fixture
def spamass_milter(tmp_path):
    """Debian's spamd and spamass-milter (-r 15: reject at a score of 15), on free ports."""
    spamd, milter = need_tool("spamd"), need_tool("spamass-milter")
    spamd_port, milter_port = free_port(), free_port()
    spamd_proc = subprocess.Popen(
        [spamd, "--listen=127.0.0.1:%d" % spamd_port, "--max-children=1", "--min-children=1",
         "-u", "nobody", "--nouser-config", "--pidfile=%s" % (tmp_path / "spamd.pid"),
         "--syslog=stderr"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    milter_proc = None
    try:
        wait_for(lambda: listening(spamd_port), what="spamd")
        milter_proc = subprocess.Popen(
            [milter, "-p", "inet:%d@127.0.0.1" % milter_port, "-r", "15", "--",
             "-d", "127.0.0.1", "-p", str(spamd_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: listening(milter_port), what="spamass-milter")
        yield "inet:127.0.0.1:%d" % milter_port
    finally:
        if milter_proc is not None:
            milter_proc.kill()  # libmilter's own stop waits seconds for its threads
            milter_proc.wait(20)
        spamd_proc.terminate()  # spamd stops its child itself
        spamd_proc.wait(20)


def test_spamass_milter_adds_its_headers_and_rejects_gtube(spamass_milter, tmp_path, spool):
    """SpamAssassin's folded X-Spam-Status header reaches the spool intact; the GTUBE test
    message is refused with spamass-milter's own reply, and nothing is kept."""
    converse = converse_with(tmp_path, spool, milters=spamass_milter)
    ham = b"From: a@example.test\r\nSubject: hello\r\n\r\nhi there\r\n."
    assert converse.codes(message("a@example.test", "u@example.test", text=ham))[-2] == 250
    _, text = entry(spool)
    assert b"\r\nX-Spam-Status: No, score=" in text
    assert b"\r\nX-Spam-Checker-Version: SpamAssassin " in text
    status = text.split(b"X-Spam-Status: ", 1)[1].split(b"\r\nX-Spam-", 1)[0]
    assert all(line[:1] == b"\t" for line in status.split(b"\r\n")[1:])
    os.unlink(os.path.join(spool.path, spooled(spool)[0]))
    spam = (b"Subject: spam\r\n\r\n"
            b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n.")
    replies = converse(message("a@example.test", "u@example.test", text=spam))
    assert replies[-2][1] == ["550 5.7.1 Blocked by SpamAssassin"]
    assert spooled(spool) == []


def test_pymilter_on_a_unix_socket(tmp_path, spool):
    """unix:PATH reaches a milter on a Unix socket (libmilter's own unix: listener)."""
    need_pymilter()
    path = tmp_path / "milter.sock"
    proc = subprocess.Popen([SYSTEM_PYTHON, PEER, "unix:%s" % path, str(tmp_path / "ev")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def accepting():
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(path))
                    return True
                except OSError:
                    return False
        wait_for(accepting, what="the milter's socket")
        converse = converse_with(tmp_path, spool, milters="unix:%s" % path)
        replies = converse(message("plain@example.test", "reject@example.test"))
    finally:
        proc.kill()
        proc.wait(10)
    assert replies[3][1] == ["550 5.7.1 Command rejected"]


def test_auth_macros_and_attributes(pymilter, tmp_path, spool):
    """After AUTH, milters get {auth_type} and {auth_authen} at MAIL."""
    import base64

    from netsmtp.auth import hash_password
    address, events = pymilter
    users = tmp_path / "users"
    users.write_text("ann:%s\n" % hash_password("secret"))
    converse = converse_with(tmp_path, spool, milters=address, auth_file=str(users),
                             auth_plaintext=True)
    plain = base64.b64encode(b"\0ann\0secret")
    assert converse([b"EHLO client.test", b"AUTH PLAIN " + plain,
                     *message("plain@example.test", "u@example.test")[1:]])[2][0] == 235
    mail = wait_for(lambda: [e for e in events() if e["event"] == "mail"], what="mail")[0]
    assert mail["macros"]["{auth_type}"] == "PLAIN"
    assert mail["macros"]["{auth_authen}"] == "ann"
