"""Nothing leaks, one bad entry never stops the queue, the smarthost cannot stall it.

Security review 2: L1-L6, L8, L10, L11 and I2, I3.
"""

import json
import logging
import os
import socket
import socketserver
import stat
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, Conversation, make_options, replies_of
from netsmtp import limits
from netsmtp.auth import PasswordFile, _parse, hash_password
from netsmtp.envelope import Envelope
from netsmtp.limits import FailureLog, KeyedTimes, SharedLimits, SharedState
from netsmtp.queue_cli import queue_main, send_main
from netsmtp.session import Session
from netsmtp.spool import Spool, new_queue_id
from netsmtp.wire import HEADER_LIMIT, HeaderSection
from smarthost import CaptureServer, put, run_cli


# -- shared counters (L1, L2) -----------------------------------------------------

def test_limits_from_another_boot_are_reset(tmp_path, caplog):
    """A limits.json left before a reboot (another boot id, stamps in the future, pids
    that now belong to others) refuses nobody and is reset."""
    caplog.set_level(logging.INFO, logger="netsmtp")
    options = make_options(tmp_path, conn_rate_total="50/60", max_sessions_per_client=1)
    path = tmp_path / "spool" / "locks" / "limits.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"boot": "another-boot", "starts": [time.time() + 86400] * 50,
                                "sessions": {"1:1": "192.0.2.10"}}))
    assert SharedLimits(options).admit("192.0.2.10") is None
    doc = json.loads(path.read_text())
    assert doc["boot"] == limits.boot_id() and len(doc["starts"]) == 1
    assert "from another boot, reset" in caplog.text


def test_old_format_limits_file_is_replaced(tmp_path, caplog):
    """The limits.json of an older netsmtp (monotonic stamps, bare pids) is replaced."""
    options = make_options(tmp_path, conn_rate_total="50/60", max_sessions_per_client=1)
    path = tmp_path / "spool" / "locks" / "limits.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"starts": [[1e9, "192.0.2.10"]] * 50,
                                "sessions": {"1": "192.0.2.10"}}))
    assert SharedLimits(options).admit("192.0.2.10") is None
    assert "corrupt, replaced with a fresh one" in caplog.text


def test_a_crowd_of_new_clients_does_not_reset_a_guesser(tmp_path, monkeypatch):
    """Past MAX_TRACKED keys the ones with the fewest failures go, never everyone's: a
    guesser's 50 failures survive 400 one-off clients."""
    monkeypatch.setattr(limits, "MAX_TRACKED", KeyedTimes.SHARDS * 2)
    failures = FailureLog(str(tmp_path))
    for _ in range(50):
        failures.record("198.51.100.66")
    for n in range(400):
        failures.record("2001:db8:%x::1" % n)
    assert failures.recent("198.51.100.66") == 50


def test_an_update_rewrites_one_small_shard(tmp_path):
    """An update touches one shard file however many clients are tracked, so its cost
    does not grow with them."""
    failures = FailureLog(str(tmp_path))
    for n in range(640):
        failures.record("2001:db8:%x::1" % n)
    locks = tmp_path / "locks"
    before = {p.name: p.read_bytes() for p in locks.glob("auth-failures.*.json")}
    failures.record("203.0.113.1")
    after = {p.name: p.read_bytes() for p in locks.glob("auth-failures.*.json")}
    assert len(before) == KeyedTimes.SHARDS
    assert sum(before[name] != after[name] for name in before) == 1
    assert max(p.stat().st_size for p in locks.glob("auth-failures.*.json")) < 64 * 1024


def test_no_shared_state_write_follows_a_symlink(tmp_path):
    """A symlink planted at the temporary name or at the file itself is replaced, and
    what it points at is untouched."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = tmp_path / "locks" / "state.json"
    path.parent.mkdir()
    os.symlink(victim, "%s.%d.tmp" % (path, os.getpid()))
    SharedState(str(path)).update(lambda doc: doc.update(a=1))
    os.unlink(path)
    os.symlink(victim, path)
    SharedState(str(path)).update(lambda doc: doc.update(b=2))
    assert victim.read_text() == "precious"
    assert not os.path.islink(path) and json.loads(path.read_text()) == {"b": 2}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600



@pytest.mark.parametrize("folder", ["tmp", "locks"])
def test_spool_folder_that_is_a_symlink_is_refused(tmp_path, folder):
    """A spool's tmp/ or locks/ planted as a symlink is refused at start (exit 1, a
    message), and nothing is written where it points."""
    victim = tmp_path / "victim"
    victim.mkdir()
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    os.symlink(victim, spool / folder)
    proc = subprocess.run([sys.executable, "-m", "netsmtp", "--stdin", "--spool", str(spool),
                           "--hostname", "mx.test"], input=b"QUIT\r\n", capture_output=True,
                          cwd=ROOT, timeout=30, env={**os.environ, "TCPREMOTEIP": "192.0.2.9"})
    assert proc.returncode == 1
    assert proc.stdout.startswith(b"421 4.3.0 ")
    assert b"symlink" in proc.stderr
    assert os.listdir(victim) == []


def test_quarantine_that_is_a_symlink_is_not_followed(spool, tmp_path, capsys):
    """netsmtp-send does not move a bad entry into a quarantine/ planted as a symlink:
    the entry stays, reported as an error, and nothing lands where the link points."""
    victim = tmp_path / "victim"
    victim.mkdir()
    os.symlink(victim, os.path.join(spool.path, "quarantine"))
    queue_id = put(spool)
    path = spool.entry_path(queue_id)
    with open(path, "r+b") as f:
        f.write(b"{not json")
    assert run_cli(send_main, [spool.path]) == 1
    assert os.listdir(victim) == []
    assert os.path.exists(path)


# -- inetd never leaks (L4) -----------------------------------------------------

def stdin_over_socketpair(spool, args, stderr_too=True):
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "netsmtp", "--stdin", "--spool", spool, "--hostname", "mx.test",
         *args], stdin=theirs, stdout=theirs, stderr=theirs if stderr_too else subprocess.PIPE,
        cwd=ROOT, env={**os.environ, "TCPREMOTEIP": "192.0.2.9"})
    theirs.close()
    ours.sendall(b"QUIT\r\n")
    ours.shutdown(socket.SHUT_WR)
    ours.settimeout(30)
    received = b"".join(iter(lambda: ours.recv(4096), b""))
    proc.wait(30)
    return received, proc


def test_inetd_shows_no_traceback_when_the_limits_cannot_be_read(tmp_path):
    """fds 0, 1 and 2 on the connection (inetd) and an unreadable limits file: the client
    gets exactly one 421 4.3.0 line and no exception text."""
    spool = tmp_path / "spool"
    (spool / "locks" / "limits.json").mkdir(parents=True)  # unreadable as a file
    received, _ = stdin_over_socketpair(str(spool), ["--max-sessions-per-client", "5"])
    assert received == b"421 4.3.0 mx.test service not available, try again later\r\n"


def test_inetd_replaces_a_corrupt_limits_file(tmp_path):
    """A limits.json that is JSON of the wrong shape is replaced and the session served."""
    spool = tmp_path / "spool"
    (spool / "locks").mkdir(parents=True)
    (spool / "locks" / "limits.json").write_text("[]")
    received, proc = stdin_over_socketpair(str(spool), ["--max-sessions-per-client", "5"],
                                           stderr_too=False)
    assert [code for code, _ in replies_of(received)] == [220, 221]
    assert b"corrupt, replaced" in proc.stderr.read()


# -- header unfolding (L3) ------------------------------------------------------------

def test_header_unfolding_is_linear():
    """Four times the continuation lines cost about four times the CPU, not sixteen."""
    def cost(size):
        section = HeaderSection()
        section.feed(b"X: a\r\n" + b" \r\n" * (size // 3))
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            section.headers()
            best = min(best, time.process_time() - started)
        return best
    small, large = cost(HEADER_LIMIT // 4), cost(HEADER_LIMIT)
    assert large < 10 * max(small, 1e-4)


# -- the queue (L5, L6, L8) -----------------------------------------------------------

@pytest.mark.parametrize("field,value", [("arrival", "soon"), ("arrival", float("inf")),
                                         ("helo", 7), ("tls", "yes"), ("client", [1])])
def test_bad_typed_entries_are_quarantined_and_due_goes_on(spool, field, value, capsys):
    """An entry whose JSON has a wrong type is quarantined; --due sends the good one
    beside it and exits 1."""
    with CaptureServer() as smarthost:
        put(spool, arrival=time.time() - 10)
        values = dict(sender="a@b.test", recipients=["u@x.test"], helo="c.test",
                      client="192.0.2.1", id=new_queue_id(), arrival=time.time() - 20)
        values[field] = value
        bad = values["id"]
        spool.add(Envelope(**values), b"Subject: bad\r\n\r\nx\r\n")
        code = run_cli(send_main, ["--due", "--smarthost", smarthost.address,
                                   "--smarthost-tls", "off", spool.path])
    out = capsys.readouterr().out
    assert code == 1 and "%s: quarantined" % bad in out
    assert len(smarthost.messages) == 1 and spool.queue_ids() == []
    assert any(bad in name for name in os.listdir(os.path.join(spool.path, "quarantine")))


def test_bad_typed_state_is_quarantined(spool, capsys):
    """A state with "attempts": Infinity (int() overflows) is quarantined, not an error
    at every run."""
    with CaptureServer() as smarthost:
        queue_id = put(spool)
        with open(spool.state_path(queue_id), "w") as f:
            f.write('{"version": 3, "id": "%s", "attempts": Infinity, "next_attempt": null, '
                    '"last_attempt": null, "last_error": null, "recipients": []}' % queue_id)
        assert run_cli(send_main, ["--smarthost", smarthost.address, "--smarthost-tls", "off",
                                   spool.path]) == 1
    assert "%s: quarantined" % queue_id in capsys.readouterr().out


def test_a_message_with_the_most_recipients_thaws(tmp_path):
    """With --max-recipients 5000, 4200 recipients of 250 octets got 250: the entry,
    over a megabyte of envelope, thaws and is not quarantined."""
    options = make_options(tmp_path, max_recipients=5000, max_session_recipients=0,
                           relay_networks="0.0.0.0/0")
    spool = Spool(options.spool)
    spool.prepare()
    recipients = [("u%04d" % n + "x" * 59 + "@" + "d" * 180 + ".test").encode()
                  for n in range(4200)]
    lines = [b"EHLO c.test", b"MAIL FROM:<a@c.test>"]
    lines += [b"RCPT TO:<" + r + b">" for r in recipients] + [b"DATA", b"hi", b"."]
    replies = Conversation(options, spool)(lines)
    assert replies[-1][0] == 250
    [queue_id] = spool.queue_ids()
    envelope = Envelope.thaw(spool.entry_path(queue_id))
    assert len(envelope.recipients) == 4200


def test_too_many_recipients_for_the_envelope_bound_is_refused(tmp_path):
    """--max-recipients over the envelope bound is refused at start with a message."""
    result = subprocess.run([sys.executable, "-m", "netsmtp", "--max-recipients", "100000",
                             "--spool", str(tmp_path / "s")], capture_output=True, cwd=ROOT,
                            timeout=30)
    assert result.returncode == 2 and b"--max-recipients: at most" in result.stderr


@pytest.mark.parametrize("name", ["tmp", "locks", "quarantine"])
def test_spool_named_like_a_spool_folder_is_refused(tmp_path, name, capsys):
    """A spool at BASE/tmp (or locks, quarantine) is refused by netsmtp-send and
    netsmtp-queue with a message and exit 1; a spool's own folders are still skipped."""
    spool = Spool(tmp_path / name)
    for folder in ("tmp", "locks"):
        os.makedirs(os.path.join(spool.path, folder))
    put(spool)
    assert run_cli(send_main, ["--smarthost", "127.0.0.1:1", spool.path]) == 1
    assert "may not be named %s" % name in capsys.readouterr().err
    assert run_cli(queue_main, ["--spool", spool.path]) == 1
    assert "may not be named %s" % name in capsys.readouterr().err
    with pytest.raises(OSError):
        spool.prepare()
    good = Spool(tmp_path / "spool")
    good.prepare()
    assert run_cli(send_main, ["--smarthost", "127.0.0.1:1", good.path,
                               os.path.join(good.path, "tmp"),
                               os.path.join(good.path, "locks")]) == 0


# -- the smarthost (I2) and overrides (I3) ---------------------------------------------

class Trickler(socketserver.BaseRequestHandler):
    """A smarthost that greets, then answers EHLO with continuation lines for ever,
    a line every 0.05 s (each read is quick, the reply never ends)."""

    def handle(self):
        self.request.sendall(b"220 slow.test ESMTP\r\n")
        self.request.recv(1024)
        try:
            while not self.server.done.is_set():
                self.request.sendall(b"250-" + b"x" * 60 + b"\r\n")
                self.server.done.wait(0.05)
        except OSError:
            pass


def test_smarthost_deadline_ends_a_never_ending_reply(spool, capsys):
    """--smarthost-deadline 2: a smarthost whose EHLO reply trickles on for ever cannot
    hold netsmtp-send: the entry is deferred and the run ends."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Trickler)
    server.daemon_threads = True
    server.done = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        put(spool)
        code = run_cli(send_main, ["--smarthost", "127.0.0.1:%d" % server.server_address[1],
                                   "--smarthost-tls", "off", "--smarthost-deadline", "2",
                                   spool.path])
    finally:
        server.done.set()
        server.shutdown()
        server.server_close()
    assert code == 75 and len(spool.queue_ids()) == 1
    assert "deferred" in capsys.readouterr().out


class Aliasing(Session):
    """An override whose alias table holds a line break."""

    def check_rcpt_to(self, address, params):
        if address == "list@mx.test":
            return ["a@mx.test", "b@mx.test>\r\nRCPT TO:<victim@far.test"]
        return super().check_rcpt_to(address, params)


def test_override_replacements_are_validated(tmp_path, caplog):
    """Addresses a check_rcpt_to override returns are checked like RCPT arguments: one
    holding CR LF is 451 4.3.0 and logged, and nothing of it reaches the envelope."""
    options = make_options(tmp_path)
    spool = Spool(options.spool)
    spool.prepare()
    converse = Conversation(options, spool, session_class=Aliasing)
    replies = converse([b"EHLO c.test", b"MAIL FROM:<a@c.test>", b"RCPT TO:<list@mx.test>",
                        b"RCPT TO:<u@mx.test>"])
    assert replies[3] == (451, ["451 4.3.0 Local error in processing, try again later"])
    assert converse.session.envelope.recipients == ["u@mx.test"]
    assert "returned a bad address" in caplog.text


# -- secrets (L10, L11) -----------------------------------------------------------------

def test_scrypt_cost_is_capped_at_64_mib():
    """A hash line whose check would take more than 64 MiB is refused."""
    with pytest.raises(ValueError):
        _parse("$scrypt$ln=20,r=32,p=1$AAAA$AAAA")
    assert _parse("$scrypt$ln=16,r=8,p=1$AAAA$AAAA")[:3] == (16, 8, 1)


def test_unknown_users_cost_the_highest_cost_in_the_file(tmp_path):
    """The dummy hash for unknown users runs at the file's highest cost, so a user with
    a raised cost cannot be told from an unknown one by timing."""
    users = tmp_path / "users"
    users.write_text("alice:%s\nbob:$scrypt$ln=15,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$%s\n" % (
        hash_password("pw"), "A" * 43))
    passwords = PasswordFile(str(users))
    assert not passwords.check("nobody", "pw")
    assert _parse(passwords.dummy)[:3] == (15, 8, 1)


def test_readable_password_file_warns_at_start(tmp_path):
    """--auth-file readable by group or others: a warning at start, naming the file."""
    users = tmp_path / "users"
    users.write_text("alice:%s\n" % hash_password("pw"))
    users.chmod(0o644)
    result = subprocess.run([sys.executable, "-m", "netsmtp", "--stdin", "--spool",
                             str(tmp_path / "s"), "--hostname", "mx.test", "--auth-file",
                             str(users)], input=b"QUIT\r\n", capture_output=True, cwd=ROOT,
                            timeout=30)
    assert b"readable by group or others (mode 0644)" in result.stderr
    users.chmod(0o600)
    result = subprocess.run([sys.executable, "-m", "netsmtp", "--stdin", "--spool",
                             str(tmp_path / "s"), "--hostname", "mx.test", "--auth-file",
                             str(users)], input=b"QUIT\r\n", capture_output=True, cwd=ROOT,
                            timeout=30)
    assert b"readable by group" not in result.stderr


def test_spool_and_its_files_are_private(tmp_path):
    """The spool and its folders are created 0700, its entries 0600."""
    spool = Spool(tmp_path / "new-spool")
    spool.prepare()
    for folder in (spool.path, spool.tmp, spool.locks):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, folder
    queue_id = put(spool)
    assert stat.S_IMODE(os.stat(spool.entry_path(queue_id)).st_mode) == 0o600


def test_maildir_messages_are_private(tmp_path, caplog):
    """A message delivered to a Maildir is 0600, whatever the umask."""
    caplog.set_level(logging.INFO)
    root = tmp_path / "maildirs"
    (root / "u").mkdir(parents=True)
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    put(spool, recipients=["u@mx.test"])
    old = os.umask(0o022)
    try:
        assert run_cli(send_main, ["--maildir-root", root, "--local-domains", "mx.test",
                                   "--hostname", "mx.test", spool.path]) == 0
    finally:
        os.umask(old)
    [message] = list((root / "u" / "new").iterdir())
    assert stat.S_IMODE(message.stat().st_mode) == 0o600


def test_inetd_never_prints_a_traceback_to_the_client(tmp_path):
    """Even an exception nothing catches (here: a broken serve_stdin) prints nothing on
    fd 2 when fd 2 is the connection."""
    code = ("import sys, netsmtp.inetd as inetd\n"
            "def broken(*args): raise ZeroDivisionError('secret path /opt/netsmtp')\n"
            "inetd.serve_stdin = broken\n"
            "from netsmtp.cli import main\n"
            "main(sys.argv[1:])\n")
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-c", code, "--stdin", "--spool",
                             str(tmp_path / "spool"), "--hostname", "mx.test"],
                            stdin=theirs, stdout=theirs, stderr=theirs, cwd=ROOT)
    theirs.close()
    ours.shutdown(socket.SHUT_WR)
    ours.settimeout(30)
    received = b"".join(iter(lambda: ours.recv(4096), b""))
    proc.wait(30)
    assert proc.returncode != 0
    assert b"Traceback" not in received and b"secret" not in received
