"""AUTH (RFC 4954): PLAIN and LOGIN, the password file, and their edge cases."""

import base64
import io
import logging
import os
import smtplib
import subprocess
import sys
import time

import pytest

from conftest import Recorded, client_context, need_tool, spooled
from netsmtp.auth import PasswordFile, hash_password, verify_password
from netsmtp.cli import passwd
from netsmtp.spool import Spool

PASSWORD = "s3cret pass!"
HELLO = [b"EHLO client.test"]


def b64(text):
    return base64.b64encode(text.encode() if isinstance(text, str) else text)


def keywords(replies):
    """The EHLO keywords of a conversation's second reply."""
    return [line[4:] for line in replies[1][1]]


def plain(user="alice", password=PASSWORD, authzid=""):
    return b64("%s\0%s\0%s" % (authzid, user, password))


@pytest.fixture(scope="module")
def stored_hash():
    return hash_password(PASSWORD)


@pytest.fixture
def auth_file(tmp_path, stored_hash):
    path = tmp_path / "users"
    path.write_text("# users\nalice:%s\n" % stored_hash)
    return str(path)


@pytest.fixture
def auth(converse, auth_file):
    """A conversation whose session offers AUTH in plaintext, with no failure delay."""
    converse.options = converse.options.replace(
        auth_file=auth_file, auth_plaintext=True, auth_fail_delay=0)
    return converse


# -- the password file and netsmtp-passwd --------------------------------------------

def test_hash_is_salted_scrypt(stored_hash):
    """Hashes are scrypt with a random salt; only the right password matches."""
    assert stored_hash.startswith("$scrypt$ln=14,r=8,p=1$")
    assert hash_password(PASSWORD) != stored_hash
    assert verify_password(PASSWORD, stored_hash)
    assert not verify_password(PASSWORD + "x", stored_hash)
    assert not verify_password(PASSWORD, None)
    assert not verify_password(PASSWORD, "plain-text-password")


def test_netsmtp_passwd_prints_a_usable_line(monkeypatch, capsys, tmp_path):
    """netsmtp-passwd USER reads the password from stdin and prints user:hash."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("hunter2\n"))
    assert passwd(["bob"]) == 0
    line = capsys.readouterr().out.strip()
    user, _, stored = line.partition(":")
    assert user == "bob" and "hunter2" not in line
    (tmp_path / "users").write_text(line + "\n")
    assert PasswordFile(str(tmp_path / "users")).check("bob", "hunter2")


def test_netsmtp_passwd_refuses_bad_input(monkeypatch):
    """An empty password (exit 1) and a user name with a colon (exit 2) are refused."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert passwd(["bob"]) == 1
    with pytest.raises(SystemExit) as exc:
        passwd(["bo:b"])
    assert exc.value.code == 2


def test_password_file_is_reread_when_changed(tmp_path, stored_hash):
    """A user added to the file can log in without a restart."""
    path = tmp_path / "users"
    path.write_text("alice:%s\n" % stored_hash)
    users = PasswordFile(str(path))
    assert users.lookup("carol") is None
    path.write_text("alice:%s\ncarol:%s\n" % (stored_hash, stored_hash))
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert users.check("carol", PASSWORD)


# -- the conversation ----------------------------------------------------------------

def test_auth_advertised_only_when_allowed(converse, auth_file):
    """AUTH is offered with a password file over TLS or with --auth-plaintext only."""
    converse.options = converse.options.replace(auth_file=auth_file)
    assert "AUTH PLAIN LOGIN" not in keywords(converse(HELLO))
    assert converse([*HELLO, b"AUTH PLAIN " + plain()])[-1] == (
        538, ["538 5.7.11 Encryption required for requested authentication mechanism"])
    converse.options = converse.options.replace(auth_plaintext=True)
    assert "AUTH PLAIN LOGIN" in keywords(converse(HELLO))


def test_auth_not_configured_is_502(converse):
    """Without --auth-file AUTH is not implemented."""
    assert converse.codes([*HELLO, b"AUTH PLAIN " + plain()])[-1] == 502


def test_plain_with_initial_response(auth, spool):
    """AUTH PLAIN with an initial response: 235 2.7.0, then the trace says ESMTPA."""
    replies = auth([*HELLO, b"AUTH PLAIN " + plain(), b"MAIL FROM:<alice@client.test>",
                    b"RCPT TO:<u@mx.test>", b"DATA", b"Subject: a\r\n\r\nhi\r\n."])
    assert replies[2] == (235, ["235 2.7.0 Authentication successful"])
    assert auth.session.auth_user == "alice"
    with open(os.path.join(spool.path, spooled(spool)[0]), "rb") as f:
        assert b" with ESMTPA id " in f.read()


def test_plain_without_initial_response(auth):
    """AUTH PLAIN alone gets an empty 334 challenge; the answer follows on its own line."""
    replies = auth([*HELLO, b"AUTH PLAIN", plain()])
    assert replies[2] == (334, ["334 "]) and replies[3][0] == 235


def test_login_with_and_without_initial_response(auth):
    """AUTH LOGIN asks Username: then Password: (base64); an initial response is the user."""
    replies = auth([*HELLO, b"AUTH LOGIN", b64("alice"), b64(PASSWORD)])
    assert replies[2] == (334, ["334 VXNlcm5hbWU6"])
    assert replies[3] == (334, ["334 UGFzc3dvcmQ6"])
    assert replies[4][0] == 235
    assert auth.codes([*HELLO, b"AUTH LOGIN " + b64("alice"), b64(PASSWORD)])[2:] == [334, 235]


def test_wrong_password_is_535(auth):
    """A wrong password, an unknown user, or a foreign authzid get 535 5.7.8."""
    for response in (plain(password="wrong"), plain(user="mallory"),
                     plain(authzid="root")):
        replies = auth([*HELLO, b"AUTH PLAIN " + response, b"MAIL FROM:<a@client.test>"])
        assert replies[2] == (535, ["535 5.7.8 Authentication credentials invalid"])
        assert auth.session.auth_user is None


def test_star_cancels(auth):
    """"*" instead of a response cancels with 501 5.7.0 (RFC 4954 section 4)."""
    assert auth([*HELLO, b"AUTH LOGIN", b"*"])[3] == (501, ["501 5.7.0 Authentication cancelled"])
    assert auth.codes([*HELLO, b"AUTH PLAIN", b"*", b"NOOP"])[2:] == [334, 501, 250]


def test_auth_sequence_errors(auth):
    """AUTH twice, before EHLO, after HELO or in a transaction gets 503."""
    assert auth.codes([*HELLO, b"AUTH PLAIN " + plain(), b"AUTH PLAIN " + plain()])[-1] == 503
    assert auth.codes([b"AUTH PLAIN " + plain()])[-1] == 503
    assert auth.codes([b"HELO client.test", b"AUTH PLAIN " + plain()])[-1] == 503
    assert auth.codes([*HELLO, b"MAIL FROM:<a@client.test>", b"AUTH PLAIN " + plain()])[-1] == 503


def test_auth_syntax_errors(auth):
    """Unknown mechanism 504; bad base64, a malformed PLAIN message or no mechanism 501."""
    assert auth([*HELLO, b"AUTH CRAM-MD5"])[-1] == (
        504, ["504 5.5.4 Unrecognized authentication mechanism CRAM-MD5"])
    assert auth.codes([*HELLO, b"AUTH PLAIN !!notbase64"])[-1] == 501
    assert auth.codes([*HELLO, b"AUTH PLAIN " + b64("no-nuls-here")])[-1] == 501
    assert auth.codes([*HELLO, b"AUTH"])[-1] == 501
    assert auth.codes([*HELLO, b"AUTH LOGIN", b"A" * 13000, b"NOOP"])[2:] == [334, 500, 250]


def test_only_mechanism_methods_are_reachable(auth):
    """AUTH names reach only auth_NAME mechanisms: not helpers such as auth_mechanisms."""
    assert "AUTH PLAIN LOGIN" in keywords(auth(HELLO))
    assert auth.session.auth_mechanisms() == ["PLAIN", "LOGIN"]
    for name in (b"MECHANISMS", b"mechanisms", b"PLAIN_", b"_PLAIN"):
        assert auth.codes([*HELLO, b"AUTH " + name, b"NOOP"])[2:] == [504, 250], name


@pytest.fixture
def recorded(auth):
    auth.session_class = Recorded
    auth.options = auth.options.replace(auth_fail_delay=1)
    return auth


def test_failures_are_counted_per_client_and_user_and_slowed(recorded, auth_file):
    """Each failure waits auth_fail_delay times the recent failures of the client or the
    user, across sessions; another client trying another user is not slowed."""
    for _ in range(3):
        assert recorded.codes([*HELLO, b"AUTH PLAIN " + plain(password="x")])[-1] == 535
    assert recorded.session.pauses == (3,)
    recorded.codes([*HELLO, b"AUTH PLAIN " + plain(user="bob", password="x")],
                   peer="198.51.100.7")
    assert recorded.session.pauses == (1,)
    recorded.codes([*HELLO, b"AUTH PLAIN " + plain(password="x")], peer="203.0.113.9")
    assert recorded.session.pauses == (4,)  # alice's failures, from any address


def test_every_answer_waits_after_failures(recorded):
    """After three failures of the client even the right password is answered only after
    the delay (3 x auth_fail_delay), so a guesser that hangs up early learns nothing;
    before any failure there is no delay."""
    assert recorded.codes([*HELLO, b"AUTH PLAIN " + plain()])[-1] == 235
    assert recorded.session.pauses == ()
    recorded.codes([*HELLO, b"AUTH PLAIN " + plain(password="x")] * 3)
    assert recorded.codes([*HELLO, b"AUTH PLAIN " + plain()])[-1] == 235
    assert recorded.session.pauses == (3,)


def test_auth_delay_is_capped_at_30_seconds(recorded):
    """However many failures, no AUTH answer waits more than 30 s."""
    recorded.options = recorded.options.replace(auth_fail_delay=20)
    recorded.codes([*HELLO, b"AUTH PLAIN " + plain(password="x")] * 2)
    assert recorded.session.pauses == (20, 30)


def test_unwritable_failure_log_refuses_auth(recorded, monkeypatch, caplog):
    """A failure log that cannot be written (a full or read-only disk) refuses AUTH with
    454 4.7.0, right password or wrong, and says so in the log: never fails open."""
    def full(self, keys, add, now=None):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("netsmtp.limits.KeyedTimes.update", full)
    replies = recorded([*HELLO, b"AUTH PLAIN " + plain(password="x"), b"AUTH PLAIN " + plain()])
    assert [r[0] for r in replies[2:]] == [454, 454]
    assert replies[2][1] == ["454 4.7.0 Temporary authentication failure"]
    assert "No space left on device" in caplog.text


def test_corrupt_failure_log_is_replaced(recorded, caplog):
    """A corrupt shard of the failure log is replaced with a fresh one and logged."""
    locks = os.path.join(recorded.options.spool, "locks")
    os.makedirs(locks, exist_ok=True)
    for shard in range(64):
        with open(os.path.join(locks, "auth-failures.%02d.json" % shard), "w") as f:
            f.write('{"client 192.0.2.1": "soon"')
    assert recorded.codes([*HELLO, b"AUTH PLAIN " + plain(password="x")])[-1] == 535
    assert recorded.session.pauses == (1,)
    assert "corrupt, replaced with a fresh one" in caplog.text


def test_secrets_are_never_logged(auth, caplog):
    """Neither the password nor its base64 form reaches the log, success or failure."""
    caplog.set_level(logging.DEBUG, logger="netsmtp")
    auth([*HELLO, b"AUTH PLAIN " + plain(), b"QUIT"])
    auth([*HELLO, b"AUTH LOGIN", b64("alice"), b64("wrong-" + PASSWORD)])
    text = caplog.text
    assert "alice" in text
    for secret in (PASSWORD, plain().decode(), b64(PASSWORD).decode(), b64("wrong-" + PASSWORD).decode()):
        assert secret not in text


def test_authenticated_clients_may_relay(auth):
    """Relaying is refused to an unknown client unless it authenticated."""
    auth.options = auth.options.replace(relay_networks="none")
    assert auth.codes([*HELLO, b"MAIL FROM:<a@client.test>", b"RCPT TO:<x@far.test>"])[-1] == 550
    assert auth.codes([*HELLO, b"AUTH PLAIN " + plain(), b"MAIL FROM:<a@client.test>",
                       b"RCPT TO:<x@far.test>"])[-1] == 250


def test_require_auth(auth):
    """--require-auth: MAIL before AUTH gets 530 5.7.0 (RFC 4954 section 6)."""
    auth.options = auth.options.replace(require_auth=True)
    assert auth([*HELLO, b"MAIL FROM:<a@client.test>"])[-1] == (
        530, ["530 5.7.0 Must issue an AUTH command first"])
    assert auth.codes([*HELLO, b"AUTH PLAIN " + plain(), b"MAIL FROM:<a@client.test>"])[-1] == 250


def test_mail_auth_parameter(auth):
    """MAIL's AUTH= parameter (RFC 4954 section 5) is accepted; from a client that did
    not authenticate it counts as AUTH=<>."""
    auth([*HELLO, b"MAIL FROM:<a@client.test> AUTH=someone+40client.test"])
    assert auth.session.envelope.params["AUTH"] == "<>"
    auth([*HELLO, b"AUTH PLAIN " + plain(), b"MAIL FROM:<a@client.test> AUTH=alice+40client.test"])
    assert auth.session.envelope.params["AUTH"] == "alice+40client.test"
    assert auth.codes([*HELLO, b"MAIL FROM:<a@client.test> AUTH"])[-1] == 501


# -- real clients over TLS -----------------------------------------------------------

def test_smtplib_login_over_starttls(server_factory, tls_files, auth_file, tmp_path):
    """smtplib authenticates after STARTTLS and relays; AUTH is not offered before TLS."""
    ca, cert, key = tls_files
    server = server_factory("--tls-cert", cert, "--tls-key", key, "--auth-file", auth_file,
                            "--relay-networks", "none", "--require-auth")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        assert not client.has_extn("auth")
        client.starttls(context=client_context(ca))
        client.ehlo("client.test")
        assert client.has_extn("auth")
        assert client.login("alice", PASSWORD)[0] == 235
        client.sendmail("alice@client.test", ["x@far.test"], b"Subject: a\r\n\r\nhi\r\n")
    server.stop()
    spool = Spool(server.spool)
    with open(os.path.join(spool.path, spooled(spool)[0]), "rb") as f:
        assert b" with ESMTPSA id " in f.read()


def test_starttls_forgets_a_plaintext_auth(server_factory, tls_files, auth_file):
    """AUTH before STARTTLS (--auth-plaintext) does not survive the handshake
    (RFC 3207 section 4.2): what a man in the middle may have sent in plaintext
    cannot let the TLS session relay; AUTH is offered again."""
    ca, cert, key = tls_files
    server = server_factory("--tls-cert", cert, "--tls-key", key, "--auth-file", auth_file,
                            "--auth-plaintext", "--relay-networks", "none")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.docmd("AUTH", "PLAIN " + plain().decode())[0] == 235
        client.starttls(context=client_context(ca))
        client.ehlo("client.test")
        assert client.has_extn("auth")
        assert client.mail("a@client.test")[0] == 250
        assert client.rcpt("x@far.test")[0] == 550


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_auth_over_tls(server_factory, tls_files, auth_file, mechanism):
    """swaks logs in with PLAIN and LOGIN over STARTTLS; a wrong password fails with 535."""
    swaks = need_tool("swaks")
    ca, cert, key = tls_files
    server = server_factory("--tls-cert", cert, "--tls-key", key, "--auth-file", auth_file,
                            "--auth-fail-delay", "0", "--error-delay", "0")
    command = [swaks, "--server", "127.0.0.1:%d" % server.port, "--tls", "--ehlo", "c.test",
               "--from", "alice@client.test", "--to", "u@mx.test", "--timeout", "10",
               "--auth", mechanism, "--auth-user", "alice"]
    good = subprocess.run(command + ["--auth-password", PASSWORD], capture_output=True,
                          text=True, timeout=30)
    assert good.returncode == 0, good.stdout
    assert "235 2.7.0" in good.stdout
    bad = subprocess.run(command + ["--auth-password", "wrong"], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode != 0 and "535 5.7.8" in bad.stdout
