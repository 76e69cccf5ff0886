"""--verify-recipients: probes at a real Postfix, at broken servers, and under a dictionary attack."""

import os
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading

import pytest

from conftest import IN_CI, ROOT, Conversation, free_port, make_options, need_tool, spooled
from netsmtp import verify
from netsmtp.spool import Spool
from smarthost import CaptureServer, run_cli

sys.path.insert(0, os.path.join(ROOT, "bench"))
import peers  # noqa: E402  (bench/peers.py starts the private Postfix)

VALID = ("ann@bench.test", "bob@bench.test")


class PostfixWithUsers(peers.Postfix):
    """The bench's private Postfix, relaying bench.test only to the users it lists."""

    MAIN_CF = peers.Postfix.MAIN_CF + (
        "relay_recipient_maps = texthash:{dir}/relay_recipients\n"
        "smtpd_reject_unlisted_recipient = yes\n")

    def start(self, workdir):
        os.makedirs(os.path.join(workdir, "postfix"), exist_ok=True)
        with open(os.path.join(workdir, "postfix", "relay_recipients"), "w") as f:
            f.writelines("%s OK\n" % user for user in VALID)
        return super().start(workdir)


@pytest.fixture(scope="module")
def postfix():
    need_tool("postfix")
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("a private Postfix needs root")
        pytest.skip("a private Postfix needs root")
    # Postfix's own processes run as the postfix user: pytest's 0700 tmp_path is
    # closed to them, so the instance lives in a directory they may enter.
    workdir = tempfile.mkdtemp(prefix="netsmtp-postfix-")
    os.chmod(workdir, 0o755)
    server = PostfixWithUsers()
    try:
        server.start(workdir)
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def options_for(tmp_path, port, **overrides):
    values = dict(local_domains="bench.test", smarthost="127.0.0.1:%d" % port,
                  smarthost_tls="off", verify_recipients=True, verify_timeout=5,
                  max_bad_commands=0)
    values.update(overrides)
    return make_options(tmp_path, **values)


def converse_with(options):
    spool = Spool(options.spool)
    spool.prepare()
    return Conversation(options, spool)


def rcpts(*addresses):
    return [b"EHLO c.test", b"MAIL FROM:<someone@far.example>",
            *(b"RCPT TO:<%s>" % a.encode() for a in addresses), b"QUIT"]


def cached(options, address):
    return verify.VerifyCache(options.spool).get(address)


def test_postfix_answers_the_probes(tmp_path, postfix):
    """A user Postfix lists gets 250, an unlisted one 550 5.1.1; both answers are cached."""
    options = options_for(tmp_path, postfix.port)
    converse = converse_with(options)
    replies = converse(rcpts("ann@bench.test", "nobody@bench.test", "Bob@bench.test"))
    assert [code for code, _ in replies[3:6]] == [250, 550, 250]
    assert replies[4][1] == ["550 5.1.1 Mailbox <nobody@bench.test> unavailable"]
    assert cached(options, "ann@bench.test")[0] == 250
    assert cached(options, "nobody@bench.test")[0] == 550
    prober = verify.verifier(options)
    assert prober.probes == 3
    # A second session asks the cache, not Postfix.
    assert converse.codes(rcpts("nobody@bench.test", "ann@bench.test"))[3:5] == [550, 250]
    assert prober.probes == 3
    prober.close()


def test_check_recipient_probes_postfix(tmp_path, postfix):
    """netsmtp --check-recipient --verify-recipients: exit 0 for a user, 1 for a stranger."""
    args = [sys.executable, "-m", "netsmtp", "--spool", str(tmp_path / "spool"),
            "--local-domains", "bench.test", "--smarthost", "127.0.0.1:%d" % postfix.port,
            "--smarthost-tls", "off", "--verify-recipients", "--check-recipient"]
    ok = subprocess.run(args + ["bob@bench.test"], cwd=ROOT, capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(args + ["stranger@bench.test"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1
    assert "550 5.1.1" in refused.stdout and "User unknown" in refused.stdout


# -- servers that misbehave -------------------------------------------------------

class Broken(socketserver.ThreadingTCPServer):
    """A server of the tests that greets (or not) and then answers as `script` says."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, script):
        self.script, self.connections, self.released = script, 0, threading.Event()
        super().__init__(("127.0.0.1", 0), BrokenHandler)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.released.set()
        self.shutdown()
        self.server_close()


class BrokenHandler(socketserver.StreamRequestHandler):
    def handle(self):
        self.server.connections += 1
        self.server.script(self)


def hang(handler):
    handler.server.released.wait(30)


def trickle_greeting(handler):
    """A byte of the greeting now and then: each read succeeds, the whole never ends."""
    for byte in b"220 slow.test ESMTP" * 100:
        if handler.server.released.wait(0.2):
            return
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()


def garbage(handler):
    handler.wfile.write(b"220 odd.test\r\n")
    handler.wfile.flush()
    while handler.rfile.readline():
        handler.wfile.write(b"hello there, how are you\r\n")
        handler.wfile.flush()


def endless_continuation(handler):
    handler.wfile.write(b"220 odd.test\r\n")
    handler.wfile.flush()
    handler.rfile.readline()
    try:
        while not handler.server.released.is_set():
            handler.wfile.write(b"250-more\r\n" * 1000)
    except OSError:
        pass


@pytest.mark.parametrize("script", [hang, trickle_greeting, garbage, endless_continuation])
def test_a_broken_server_gives_450_and_nothing_is_cached(tmp_path, script):
    """Hanging, trickling, garbage or endless replies: 450 4.1.1 within the timeout, no cache."""
    server = Broken(script)
    try:
        options = options_for(tmp_path, server.server_address[1], verify_timeout=1)
        replies = converse_with(options)(rcpts("ann@bench.test"))
        assert replies[3] == (450, ["450 4.1.1 Mailbox <ann@bench.test> cannot be verified "
                                    "now, try again later"])
        assert cached(options, "ann@bench.test") is None
    finally:
        server.close()


def test_an_unreachable_smarthost_gives_450(tmp_path):
    """Nothing listening: 450 4.1.1, not cached, and the next RCPT tries again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = options_for(tmp_path, port)
    assert converse_with(options).codes(rcpts("ann@bench.test"))[3] == 450
    assert cached(options, "ann@bench.test") is None


class CloseOnce:
    """rcpt_replies: the first RCPT after the first probe gets 421 (the server's limits)."""

    def __init__(self):
        self.rcpts = 0

    def get(self, address, default):
        self.rcpts += 1
        return "421 4.4.2 too many commands, closing" if self.rcpts == 2 else default


def test_a_closed_connection_is_reopened(tmp_path):
    """A 421 on the kept connection: the probe connects again and gets its answer."""
    with CaptureServer() as server:
        server.rcpt_replies = CloseOnce()
        options = options_for(tmp_path, server.port)
        converse = converse_with(options)
        assert converse.codes(rcpts("ann@bench.test"))[3] == 250
        assert server.connections == 1
        assert converse.codes(rcpts("bob@bench.test"))[3] == 250
        assert server.connections == 2
        assert "DATA" not in server.commands and server.messages == []
        assert [c for c in server.commands if c.startswith("MAIL")] == ["MAIL FROM:<>"] * 3


# -- a dictionary attack ----------------------------------------------------------------

class Directory:
    """rcpt_replies for the capture server: the valid users get 250, the rest 550."""

    def get(self, address, default):
        return default if address in VALID else "550 5.1.1 <%s>: user unknown" % address


def test_a_dictionary_attack_makes_no_mailbox_no_bounce_and_one_probe_per_address(
        tmp_path, server_factory):
    """1,000 guessed RCPTs at the prefork daemon: all 550, one probe each, none on a repeat."""
    guesses = ["guess%d@bench.test" % i for i in range(1000)]
    with CaptureServer() as inner:
        inner.rcpt_replies = Directory()
        server = server_factory("--local-domains", "bench.test", "--workers", "2",
                                "--smarthost", "127.0.0.1:%d" % inner.port,
                                "--smarthost-tls", "off", "--verify-recipients",
                                "--max-bad-commands", "0", "--error-delay", "0",
                                "--max-session-recipients", "0")
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                sock.sendall(b"EHLO attacker.test\r\nMAIL FROM:<victim@innocent.example>\r\n")
                sock.sendall(b"".join(b"RCPT TO:<%s>\r\n" % g.encode() for g in guesses))
                sock.sendall(b"RCPT TO:<ann@bench.test>\r\nDATA\r\n")
                reply = read_until(sock, b"354 ")
                sock.sendall(b"Subject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n")
                reply += read_until(sock, b"221 ")
            assert reply.count(b"550 5.1.1 Mailbox <guess") == 1000
            assert reply.count(b"250 2.1.5") == 1
            probes = [c for c in inner.commands if c.upper().startswith("RCPT")]
            assert len(probes) == 1001  # one per address; the repeat asked the cache
        assert "DATA" not in inner.commands and inner.messages == []
        spool = Spool(server.spool)
        assert len(spooled(spool)) == 2
        from netsmtp.queue_cli import send_main
        code = run_cli(send_main, [server.spool, "--smarthost", inner.address,
                                   "--smarthost-tls", "off", "--local-domains", "bench.test"])
        assert code == 0
        assert inner.delivered_to() == ["ann@bench.test", "ann@bench.test"]  # and no bounce
        assert spooled(spool) == []


def read_until(sock, marker):
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, data[-500:]
        data += chunk
    return data


def test_a_dictionary_attack_on_maildir_makes_no_mailbox(tmp_path):
    """1,000 guesses at a Maildir domain without a table: 1,000 x 550, no directory."""
    root = tmp_path / "mail"
    (root / "ann").mkdir(parents=True)
    options = make_options(tmp_path, maildir_root=str(root), max_bad_commands=0,
                           max_session_recipients=0)
    codes = converse_with(options).codes(rcpts(*("guess%d@mx.test" % i for i in range(1000))))
    assert codes[3:-1] == [550] * 1000
    assert os.listdir(root) == ["ann"]


def test_an_alias_to_a_remote_address_is_forwarded_once(tmp_path):
    """Two aliases naming one remote target: one RCPT for it at the smarthost, one message."""
    table = tmp_path / "recipients"
    table.write_text("ann@bench.test\nfwd@bench.test far@elsewhere.example, ann@bench.test\n"
                     "dup@bench.test far@elsewhere.example\n")
    options = make_options(tmp_path, local_domains="bench.test", recipients=str(table))
    converse = converse_with(options)
    converse([b"EHLO c.test", b"MAIL FROM:<a@c.test>", b"RCPT TO:<fwd@bench.test>",
              b"RCPT TO:<dup@bench.test>", b"DATA", b"Subject: t\r\n\r\nhi\r\n.", b"QUIT"])
    assert converse.session.messages == 1
    with CaptureServer() as smarthost:
        from netsmtp.queue_cli import send_main
        assert run_cli(send_main, [options.spool, "--smarthost", smarthost.address,
                                   "--smarthost-tls", "off", "--local-domains",
                                   "bench.test"]) == 0
        assert len(smarthost.messages) == 1
        assert smarthost.delivered_to() == ["ann@bench.test", "far@elsewhere.example"]
        assert sum(c == "RCPT TO:<far@elsewhere.example>" for c in smarthost.commands) == 1


def test_verify_recipients_needs_a_smarthost(tmp_path):
    """--verify-recipients without --smarthost is a usage error: exit 2."""
    result = subprocess.run([sys.executable, "-m", "netsmtp", "--verify-recipients",
                             "--spool", str(tmp_path / "spool"), "--check-recipient", "a@b.test"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--verify-recipients needs --smarthost" in result.stderr


def test_the_probe_uses_the_smarthosts_tls_and_auth(tmp_path):
    """The daemon's probe goes like netsmtp-send: STARTTLS checked against the CA, then AUTH."""
    import ssl

    import trustme
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "password").write_text("s3cret\n")
    with CaptureServer(tls_context=context, auth=("relay", "s3cret")) as server:
        options = options_for(tmp_path, server.port, smarthost_tls="required",
                              smarthost_ca=str(tmp_path / "ca.pem"), smarthost_user="relay",
                              smarthost_password_file=str(tmp_path / "password"))
        assert converse_with(options).codes(rcpts("ann@bench.test"))[3] == 250
        verbs = [c.split(" ")[0].upper() for c in server.commands]
        assert verbs[:5] == ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL"]
        assert server.commands[4:7] == ["MAIL FROM:<>", "RCPT TO:<ann@bench.test>", "RSET"]
        verify.verifier(options).close()
        # A certificate the CA does not vouch for: no fallback to plaintext, 450, no cache.
        trustme.CA().cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
        untrusting = options.replace(smarthost_ca=str(tmp_path / "other-ca.pem"))
        assert converse_with(untrusting).codes(rcpts("bob@bench.test"))[3] == 450
        assert cached(untrusting, "bob@bench.test") is None
        assert not any(c.startswith("RCPT TO:<bob") for c in server.commands)


def test_cached_answers_expire_and_the_cache_stays_bounded(tmp_path, monkeypatch):
    """An answer lives for its TTL; pruning drops what expired and the oldest past the cap."""
    cache = verify.VerifyCache(str(tmp_path), ttls=(100, 10))
    cache.put("Ann@bench.test", 250, "250 ok", ttl=100, now=1000)
    assert cache.get("ann@bench.test", now=1099) == (250, "250 ok")
    assert cache.get("ann@bench.test", now=1100) is None
    # A file that names another address (a hash collision, a stray copy) is no answer.
    other = os.path.join(cache.directory, cache.name("bob@bench.test") + ".json")
    shutil.copy(os.path.join(cache.directory, cache.name("ann@bench.test") + ".json"), other)
    assert cache.get("bob@bench.test", now=1000) is None
    for name in os.listdir(cache.directory):
        os.unlink(os.path.join(cache.directory, name))
    stamps = {"old": 1000, "u1": 2001, "u2": 2002, "u3": 2003, "u4": 2004}

    def left():
        return sorted(f for f in os.listdir(cache.directory) if f.endswith(".json"))

    def names(*keys):
        return sorted(cache.name(key + "@bench.test") + ".json" for key in keys)

    for key, stamp in stamps.items():
        cache.put(key + "@bench.test", 550, "550 no", ttl=10)
        os.utime(os.path.join(cache.directory, cache.name(key + "@bench.test") + ".json"),
                 (stamp, stamp))
    cache.prune(now=2004)  # "old" is older than the longest TTL
    assert left() == names("u1", "u2", "u3", "u4")
    monkeypatch.setattr(verify, "MAX_CACHED", 2)
    cache.prune(now=2004)  # over the cap: the oldest go
    assert left() == names("u3", "u4")


def test_the_wait_for_a_busy_address_counts_against_the_timeout(tmp_path, monkeypatch):
    """A RCPT that queued on the probe lock of its address probes only in what is left.

    A flood of RCPTs for one address queues on its lock: each must still be
    answered within verify_timeout of its own start, not a whole timeout after
    the probe before it let go.  The clock is a fake one the lock advances.
    """
    clock = [1000.0]
    monkeypatch.setattr(verify.time, "monotonic", lambda: clock[0])
    options = options_for(tmp_path, free_port(), verify_timeout=10)
    verifier = verify.Verifier(options)
    real_lock = verifier.cache.lock

    class QueuedLock:
        """The lock of an address another probe holds for 8 of the 10 seconds."""

        def __init__(self, address, timeout):
            self.lock = real_lock(address, timeout)

        def __enter__(self):
            clock[0] += 8
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    deadlines = []

    def probe(address, deadline=None):
        deadlines.append(deadline)
        return 0, "no answer"

    monkeypatch.setattr(verifier.cache, "lock", QueuedLock)
    monkeypatch.setattr(verifier, "probe", probe)
    assert verifier.verify("ann@bench.test")[0] == verify.UNKNOWN
    assert deadlines == [1010.0]
