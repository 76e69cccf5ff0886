"""The prefork server: a pool of warm workers behind one listening socket."""

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys


from conftest import ROOT, children, read_reply, spooled, wait_for
from netsmtp.spool import Spool

MESSAGE = b"Subject: prefork\r\n\r\nhello\r\n"


def connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock, sock.makefile("rb")


def serving_pids(output):
    """The worker pid of each session, in order, from the connect log lines."""
    return [int(pid) for pid in re.findall(r"netsmtp\[(\d+)\] DEBUG 127\.0\.0\.1: connect", output)]


def test_smtplib_sessions_through_prefork(server_factory):
    """Sessions one after another and over one connection all reach the spool."""
    server = server_factory("--workers", "2")
    for _ in range(3):
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.sendmail("a@b.test", ["u@mx.test"], MESSAGE)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        for _ in range(3):
            client.sendmail("a@b.test", ["u@mx.test"], MESSAGE)
    assert server.stop() == 0
    assert len(spooled(Spool(server.spool))) == 6
    assert "workers=2" in server.output()


def test_pool_grows_beyond_the_warm_workers(server_factory):
    """With one warm worker, six clients held open at once are all greeted."""
    server = server_factory("--workers", "1")
    master = server.proc.pid
    assert wait_for(lambda: len(children(master)) == 1)
    clients = [connect(server.port) for _ in range(6)]
    for _, reader in clients:
        assert read_reply(reader)[0] == 220
    assert len(children(master)) >= 6
    for sock, reader in clients:
        sock.sendall(b"QUIT\r\n")
        assert read_reply(reader)[0] == 221
        reader.close()
        sock.close()
    assert server.stop() == 0


def test_killed_worker_is_replaced(server_factory):
    """A worker killed by SIGKILL is replaced and the server keeps serving."""
    server = server_factory("--workers", "2")
    master = server.proc.pid
    workers = wait_for(lambda: len(children(master)) == 2 and children(master))
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    replaced = wait_for(lambda: (lambda now: len(now) == 2 and victim not in now)(children(master)))
    assert replaced
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.sendmail("a@b.test", ["u@mx.test"], MESSAGE)
    assert server.stop() == 0
    assert "worker %d killed by signal 9" % victim in server.output()


def test_sigterm_finishes_the_message_in_flight(server_factory):
    """On SIGTERM an idle session gets 421, a message in DATA completes, exit 0."""
    server = server_factory("--workers", "2")
    busy, busy_reader = connect(server.port)
    assert read_reply(busy_reader)[0] == 220
    busy.sendall(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n")
    for code in (250, 250, 250, 354):
        assert read_reply(busy_reader)[0] == code
    busy.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
    idle, idle_reader = connect(server.port)
    assert read_reply(idle_reader)[0] == 220
    idle.sendall(b"EHLO c.test\r\n")
    assert read_reply(idle_reader)[0] == 250

    server.proc.terminate()
    assert read_reply(idle_reader)[0] == 421  # so the workers have been told to stop
    busy.sendall(b"second half\r\n.\r\n")
    assert read_reply(busy_reader)[0] == 250
    assert read_reply(busy_reader)[0] == 421
    assert server.proc.wait(10) == 0
    assert len(spooled(Spool(server.spool))) == 1
    for stream in (busy_reader, busy, idle_reader, idle):
        stream.close()


def test_sigterm_reaches_a_session_on_a_worker_that_served_before(server_factory):
    """The worker's handlers, installed once, still stop a session after earlier connections."""
    server = server_factory("--workers", "1", "--log-level", "debug")
    served = set()
    for attempt in range(20):
        sock, reader = connect(server.port)
        assert read_reply(reader)[0] == 220
        pids = wait_for(lambda wanted=attempt + 1: (lambda p: len(p) == wanted and p)(
            serving_pids(server.output())))
        if pids[-1] in served:
            break
        served.add(pids[-1])
        sock.sendall(b"QUIT\r\n")
        assert read_reply(reader)[0] == 221
        reader.close()
        sock.close()
    else:
        raise AssertionError("no worker served a second connection")
    sock.sendall(b"EHLO c.test\r\n")
    assert read_reply(reader)[0] == 250
    server.proc.terminate()
    assert read_reply(reader)[0] == 421
    assert server.proc.wait(10) == 0
    reader.close()
    sock.close()


def test_worker_is_recycled_after_its_connection_limit(server_factory):
    """--max-connections-per-worker 2: no worker serves a third connection."""
    server = server_factory("--workers", "1", "--max-connections-per-worker", "2",
                            "--log-level", "debug")
    for _ in range(6):
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.noop()
    assert wait_for(lambda: len(serving_pids(server.output())) == 6)
    pids = serving_pids(server.output())
    assert max(pids.count(pid) for pid in pids) <= 2
    assert len(set(pids)) >= 3
    assert "recycled after 2 connections" in server.output()
    assert server.stop() == 0


SHRINKING_SERVER = """
import sys
from netsmtp.cli import setup_logging
from netsmtp.options import Options
from netsmtp.prefork import PreforkServer
from netsmtp.spool import Spool

class QuickToShrink(PreforkServer):
    shrink_after = 0.1

options = Options(listen="127.0.0.1:0", spool=sys.argv[1], hostname="mx.test", workers=1)
setup_logging(options)
spool = Spool(options.spool)
spool.prepare()
server = QuickToShrink(options, spool)
print(server.server_address[1], flush=True)
server.serve()
"""


def test_idle_pool_shrinks_back(tmp_path):
    """After a burst the surplus idle workers are retired down to --workers."""
    proc = subprocess.Popen([sys.executable, "-c", SHRINKING_SERVER, str(tmp_path / "spool")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        port = int(proc.stdout.readline())
        clients = [connect(port) for _ in range(5)]
        for _, reader in clients:
            assert read_reply(reader)[0] == 220
        assert len(children(proc.pid)) >= 5
        for sock, reader in clients:
            reader.close()
            sock.close()
        assert wait_for(lambda: len(children(proc.pid)) == 1, timeout=15)
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
