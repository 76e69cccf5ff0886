"""netsmtp-queue and netsmtp-send as commands: output, exit codes, concurrency, crashes."""

import json
import os
import pty
import select
import signal
import smtplib
import subprocess
import sys
import time

import pytest
from conftest import ROOT, spooled, wait_for
from smarthost import CaptureServer, put, run_cli

from netsmtp.envelope import Envelope, Recipient, Result, Status
from netsmtp.queue_cli import queue_main, send_main

SEND = os.path.join(ROOT, "scripts", "netsmtp-send")
QUEUE = os.path.join(ROOT, "scripts", "netsmtp-queue")


@pytest.fixture
def smarthost():
    with CaptureServer() as server:
        yield server


def test_queue_lists_entries_like_mailq(spool, capsys):
    """netsmtp-queue shows id, size, arrival, sender, each recipient's status and error, a total."""
    queue_id = put(spool, recipients=["u@x.test", "v@x.test"])
    envelope = Envelope.thaw(spool.entry_path(queue_id))
    envelope.status["v@x.test"] = Recipient("v@x.test", Status.DEFERRED,
                                           Result(451, "4.7.1 greylisted"))
    envelope.attempts = 1
    spool.write_state(queue_id, envelope.freeze_state())
    assert run_cli(queue_main, ["--spool", spool.path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == [queue_id, str(envelope.size)]
    assert lines[1].split()[4] == "<a@b.test>" and "attempts 1" in lines[1]
    assert lines[2].split() == ["pending", "<u@x.test>"]
    assert lines[3].split(None, 2) == ["deferred", "<v@x.test>", "(451 4.7.1 greylisted)"]
    assert lines[4] == "-- 1 Kbytes in 1 Request, 2 recipients."


def test_queue_empty_and_json(spool, capsys):
    """An empty queue says so; --json is a list with the documented keys."""
    assert run_cli(queue_main, ["--spool", spool.path]) == 0
    assert capsys.readouterr().out == "Mail queue is empty\n"
    queue_id = put(spool)
    assert run_cli(queue_main, ["--spool", spool.path, "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert {"id", "sender", "size", "arrival", "attempts", "next_attempt", "last_error",
            "recipients"} <= set(entry)
    assert entry["id"] == queue_id and entry["attempts"] == 0
    assert entry["recipients"] == [{"address": "u@x.test", "status": "pending", "error": None,
                                    "notify": None, "orcpt": None, "reports": [],
                                    "remote_mta": None}]


def test_queue_of_a_missing_spool_fails(tmp_path, capsys):
    """A spool directory that does not exist is an error, exit 1."""
    assert run_cli(queue_main, ["--spool", tmp_path / "nowhere"]) == 1
    assert "nowhere" in capsys.readouterr().err


def test_dry_run_changes_nothing(spool, smarthost, capsys):
    """--dry-run names each entry and its plan; no file changes, no connection."""
    queue_id = put(spool)
    before = sorted(os.listdir(spool.path))
    assert run_cli(send_main, ["--dry-run", "--smarthost", smarthost.address, spool.path]) == 0
    assert capsys.readouterr().out == "%s: <u@x.test> would send (smarthost %s)\n" % (
        queue_id, smarthost.address)
    assert sorted(os.listdir(spool.path)) == before and smarthost.commands == []


def test_due_sends_oldest_first_and_skips_later_ones(spool, smarthost, capsys):
    """--due takes the entries whose time has come, oldest arrival first."""
    newer = put(spool, arrival=time.time() - 10)
    later = put(spool, arrival=time.time() - 30)
    envelope = Envelope.thaw(spool.entry_path(later))
    envelope.attempts, envelope.next_attempt = 1, time.time() + 3600
    spool.write_state(later, envelope.freeze_state())
    older = put(spool, arrival=time.time() - 20)
    assert run_cli(send_main, ["--due", "--smarthost", smarthost.address,
                               "--smarthost-tls", "off", spool.path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [older, newer]
    assert spool.queue_ids() == [later]


def test_exit_code_one_for_a_path_that_is_no_entry(spool, smarthost, tmp_path, capsys):
    """A PATH that is no spool entry is refused with a message and exit 1; the rest is sent."""
    put(spool)
    stray = tmp_path / "notes.txt"
    stray.write_text("hello")
    assert run_cli(send_main, ["--smarthost", smarthost.address, "--smarthost-tls", "off",
                               stray, spool.path]) == 1
    assert "notes.txt: not a spool entry" in capsys.readouterr().err
    assert len(smarthost.messages) == 1


def test_unknown_route_is_a_usage_error(spool, capsys):
    """A route naming no known delivery is refused before anything is sent (exit 2)."""
    with pytest.raises(SystemExit) as exit:
        run_cli(send_main, ["--routes", "*=carrier_pigeon", spool.path])
    assert exit.value.code == 2
    assert "unknown delivery 'carrier_pigeon'" in capsys.readouterr().err


def test_scripts_work_from_a_checkout(spool, smarthost, tmp_path):
    """scripts/netsmtp-send and scripts/netsmtp-queue run without installing, from any directory."""
    put(spool)
    listed = subprocess.run([sys.executable, QUEUE, "--spool", spool.path], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0 and "<u@x.test>" in listed.stdout
    sent = subprocess.run([sys.executable, SEND, "--smarthost", smarthost.address,
                           "--smarthost-tls", "off", *sorted(
                               os.path.join(spool.path, n) for n in os.listdir(spool.path))],
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert sent.returncode == 0, sent.stderr
    assert len(smarthost.messages) == 1


def test_concurrent_flushes_send_each_message_once(spool, smarthost):
    """Two netsmtp-send processes over the same spool deliver every message exactly once."""
    count = 300
    for n in range(count):
        put(spool, body=b"Subject: %d\r\n\r\nbody\r\n" % n)
    command = [sys.executable, SEND, "--smarthost", smarthost.address, "--smarthost-tls", "off",
               "--log-level", "warning", spool.path]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    subjects = sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in smarthost.messages)
    assert subjects == sorted(b"%d" % n for n in range(count))
    assert spool.queue_ids() == [] and os.listdir(spool.locks) == []
    assert sum(o.count(" delivered ") for o in outputs) == count


def test_flushing_while_the_server_spools_sends_each_once(server, smarthost):
    """netsmtp-send runs while the server accepts mail: every message goes out exactly once."""
    import threading
    from netsmtp.spool import Spool
    spool = Spool(server.spool)
    count = 40

    def client():
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
            for n in range(count):
                smtp.sendmail("a@b.test", ["u@mx.test"], b"Subject: %d\r\n\r\nx\r\n" % n)

    sending = threading.Thread(target=client)
    sending.start()
    flush = ["--smarthost", smarthost.address, "--smarthost-tls", "off", "--log-level",
             "warning", spool.path]
    while sending.is_alive():
        assert run_cli(send_main, flush) == 0
    sending.join()
    assert run_cli(send_main, flush) == 0
    subjects = sorted(int(m.data.split(b"Subject: ")[1].split(b"\r\n")[0])
                      for m in smarthost.messages)
    assert subjects == list(range(count)) and spooled(spool) == []


def test_progress_bar_on_a_terminal(spool, smarthost):
    """With stdout on a terminal and many messages, a progress bar is drawn and cleared."""
    for _ in range(25):
        put(spool)
    master, slave = pty.openpty()
    run = subprocess.Popen([sys.executable, SEND, "--smarthost", smarthost.address,
                            "--smarthost-tls", "off", "--log-level", "warning", spool.path],
                           stdout=slave, stderr=subprocess.DEVNULL)
    os.close(slave)
    output = b""
    while True:
        ready, _, _ = select.select([master], [], [], 30)
        try:
            chunk = os.read(master, 65536) if ready else b""
        except OSError:  # EIO: the terminal's other end closed
            chunk = b""
        if not chunk:
            break
        output += chunk
    os.close(master)
    assert run.wait(30) == 0
    assert b"25/25" in output and b"[" + b"#" * 40 + b"]" in output
    assert output.count(b" delivered ") == 25


def kill_tree(pid):
    """SIGKILL a process and all its descendants, the parent first so none is respawned."""
    def children(p):
        try:
            with open("/proc/%d/task/%d/children" % (p, p)) as f:
                kids = [int(c) for c in f.read().split()]
        except OSError:
            return []
        return kids + [g for k in kids for g in children(k)]
    family = children(pid)
    for p in [pid, *family]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_kill_during_data_leaves_only_an_incomplete_entry(server, smarthost, capsys):
    """A server SIGKILLed in the middle of DATA leaves an entry never committed: not
    listed, not sent, skipped while young and removed with a log line once older."""
    from netsmtp.spool import Spool
    spool = Spool(server.spool)
    client = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
    client.ehlo("c.test")
    client.mail("a@b.test")
    client.rcpt("u@mx.test")
    assert client.docmd("DATA")[0] == 354
    client.send(b"Subject: half\r\n\r\n" + b"partial line\r\n" * 40000)
    # The spool writer buffers 256 KB: wait until some of the text is on disk.
    wait_for(lambda: spooled(spool) and os.path.getsize(
        os.path.join(spool.path, spooled(spool)[0])) > 100000)
    kill_tree(server.proc.pid)
    server.proc.wait(10)
    client.close()
    [name] = spooled(spool)
    assert run_cli(queue_main, ["--spool", spool.path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    send = ["--smarthost", smarthost.address, "--smarthost-tls", "off", spool.path]
    assert run_cli(send_main, send) == 0
    assert capsys.readouterr().out.startswith(name[:24] + ": incomplete (")
    assert spooled(spool) == [name]
    path = os.path.join(spool.path, name)
    os.utime(path, (time.time() - 3601,) * 2)
    assert run_cli(send_main, send) == 0
    out, err = capsys.readouterr()
    assert out.startswith(name[:24] + ": removed (")
    assert "WARNING removed %s: an entry never committed" % path in err
    assert spooled(spool) == [] and smarthost.messages == []


def test_kill_after_250_keeps_the_message_for_sending(server, smarthost):
    """A server SIGKILLed right after its 250 has the message durably; netsmtp-send delivers it."""
    from netsmtp.spool import Spool
    spool = Spool(server.spool)
    client = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
    client.ehlo("c.test")
    client.sendmail("a@b.test", ["u@mx.test"], b"Subject: kept\r\n\r\nsurvives\r\n")
    kill_tree(server.proc.pid)
    server.proc.wait(10)
    client.close()
    assert len(spooled(spool)) == 1
    assert run_cli(send_main, ["--smarthost", smarthost.address, "--smarthost-tls", "off",
                               spool.path]) == 0
    [message] = smarthost.messages
    assert message.recipients == ["u@mx.test"] and message.data.endswith(b"\r\nsurvives\r\n")
    assert message.data.startswith(b"Received: from c.test")
    assert spooled(spool) == []
