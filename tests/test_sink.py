"""netsmtp --sink and --sink-dir: the smtpd.DebuggingServer replacement, run for real."""

import os
import re
import smtplib
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, wait_for
from netsmtp.cli import main

MESSAGE = (b"From: a@example.test\r\nTo: b@elsewhere.test\r\nSubject: hi\r\n\r\n"
           b"line one\r\n.leading dot\r\n..two dots\r\n")


class SinkProcess:
    """`python -m netsmtp --sink` with its stdout and stderr read apart."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "netsmtp", "--listen", "127.0.0.1:0",
             "--hostname", "sink.test", *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out, self.err = bytearray(), bytearray()
        self.readers = [threading.Thread(target=self._drain, args=(f, buf), daemon=True)
                        for f, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()
        found = wait_for(lambda: re.search(rb"listening on [\d.]+:(\d+)", self.err),
                         what="the sink's listening line")
        self.port = int(found.group(1))

    @staticmethod
    def _drain(stream, buf):
        for chunk in iter(lambda: stream.read1(65536), b""):
            buf += chunk

    def stop(self):
        self.proc.terminate()
        code = self.proc.wait(20)
        for reader in self.readers:
            reader.join(5)
        return code


@pytest.fixture
def sink_factory():
    started = []

    def start(*args):
        started.append(SinkProcess(*args))
        return started[-1]
    yield start
    for sink in started:
        if sink.proc.poll() is None:
            sink.stop()


def send(port, sender="a@example.test", recipients=("b@elsewhere.test", "c@x.test")):
    """Send MESSAGE; smtplib dot-stuffs its lines that begin with a dot."""
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.test")
        client.sendmail(sender, list(recipients), MESSAGE)  # smtplib adds SIZE=


def test_sink_prints_envelope_message_and_end_marker_on_stdout(sink_factory, tmp_path):
    """Any recipient is accepted; stdout holds the envelope line, the unstuffed message
    and the end marker, and nothing else; the log is on stderr; nothing is spooled."""
    sink = sink_factory("--sink", "--spool", str(tmp_path / "spool"))
    send(sink.port)
    wait_for(lambda: b"END MESSAGE" in sink.out, what="the end marker")
    assert sink.stop() == 0
    lines = bytes(sink.out).split(b"\n")
    assert lines[0].startswith(b"---------- MESSAGE FOLLOWS ---------- ")
    assert b"client=127.0.0.1" in lines[0] and b"helo=client.test" in lines[0]
    assert b"from=<a@example.test> SIZE=%d" % len(MESSAGE) in lines[0]
    assert b"to=<b@elsewhere.test> <c@x.test>" in lines[0]
    assert b"\n".join(lines[1:]) == MESSAGE + \
        b"------------ END MESSAGE ------------\n"
    assert b"listening on" in sink.err and b"queued" in sink.err
    assert not (tmp_path / "spool").exists()


def test_sink_dir_writes_one_eml_per_message(sink_factory, tmp_path):
    """--sink-dir implies --sink and writes DIR/ID.eml holding the message as received."""
    out_dir = tmp_path / "mail"
    sink = sink_factory("--sink-dir", str(out_dir))
    port = sink.port
    send(port)
    send(port, recipients=["d@y.test"])
    def messages():  # a message being written is a hidden temporary file until renamed
        names = sorted(name for name in os.listdir(out_dir) if not name.startswith("."))
        return len(names) == 2 and names
    files = wait_for(messages, what="two files")
    assert sink.stop() == 0
    assert all(re.fullmatch(r"[0-9a-f]{24}\.eml", name) for name in files)
    for name in files:
        assert (out_dir / name).read_bytes() == MESSAGE
    assert sink.out == b""


def test_sink_warns_on_a_listen_address_that_is_not_loopback(sink_factory):
    """A sink reachable from the network says so at start."""
    sink = sink_factory("--sink", "--listen", "0.0.0.0:0")
    assert b"not a loopback address" in sink.err
    assert sink.stop() == 0


def test_sink_is_refused_with_stdin(capsys):
    """On --stdin, stdout is the SMTP session: --sink there exits 2."""
    with pytest.raises(SystemExit) as exit_:
        main(["--sink", "--stdin"])
    assert exit_.value.code == 2
    assert "--sink" in capsys.readouterr().err


def test_concurrent_messages_never_interleave_on_stdout(sink_factory):
    """Sessions are processes sharing stdout: each message is printed whole, however large."""
    sink = sink_factory("--sink")
    bodies = {name: (b"Subject: %s\r\n\r\n" % name) + (name * 70 + b"\r\n") * 3000
              for name in (b"a", b"b", b"c", b"d")}

    def send_one(name):
        with smtplib.SMTP("127.0.0.1", sink.port) as client:
            client.sendmail("x@example.test", ["y@example.test"], bodies[name])
    threads = [threading.Thread(target=send_one, args=(name,)) for name in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    wait_for(lambda: sink.out.count(b"END MESSAGE") == 4, what="four messages")
    assert sink.stop() == 0
    blocks = bytes(sink.out).split(b"------------ END MESSAGE ------------\n")[:-1]
    printed = sorted(block.split(b"\n", 1)[1] for block in blocks)
    assert printed == sorted(bodies.values())
