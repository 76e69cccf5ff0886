"""netsmtp-queue --hold, --release, --delete and --retry-now: durable, claim-safe, exit codes."""

import json
import os
import pwd
import subprocess
import sys
import time

from conftest import ROOT
from smarthost import CaptureServer, put, run_cli

from netsmtp.envelope import Envelope
from netsmtp.queue_cli import queue_main, send_main


def queue(spool, *args):
    return run_cli(queue_main, ["--spool", spool.path, *args])


def send(spool, smarthost, *paths):
    return run_cli(send_main, ["--smarthost", smarthost.address, "--smarthost-tls", "off",
                               "--hostname", "mx.test", *(paths or [spool.path])])


def listed(spool, capsys):
    capsys.readouterr()
    assert queue(spool, "--json") == 0
    return {e["id"]: e for e in json.loads(capsys.readouterr().out)}


def test_a_held_entry_is_never_sent_until_released(spool, capsys):
    """--hold: netsmtp-send skips it, even named on its command line; --release lets it go."""
    queue_id = put(spool)
    with CaptureServer() as smarthost:
        assert queue(spool, "--hold", queue_id) == 0
        assert capsys.readouterr().out == "%s: held\n" % queue_id
        assert listed(spool, capsys)[queue_id]["held"] is True
        assert queue(spool) == 0 and "  held" in capsys.readouterr().out
        send(spool, smarthost, spool.entry_path(queue_id))
        assert "%s: held" % queue_id in capsys.readouterr().out
        send(spool, smarthost)
        assert smarthost.messages == [] and spool.queue_ids() == [queue_id]
        assert queue(spool, "--release", queue_id) == 0
        assert listed(spool, capsys)[queue_id]["held"] is False
        assert send(spool, smarthost) == 0
    assert smarthost.delivered_to() == ["u@x.test"] and spool.queue_ids() == []


def test_hold_is_durable_in_the_state_file(spool):
    """The change is on disk when the command returns: a fresh thaw sees it."""
    queue_id = put(spool)
    assert queue(spool, "--hold", queue_id) == 0
    with open(spool.state_path(queue_id), "rb") as f:
        assert json.loads(f.read())["held"] is True
    assert Envelope.thaw(spool.entry_path(queue_id)).held


def test_delete_removes_for_good_without_a_bounce_and_logs_who(spool, capsys):
    """--delete: the entry and its state go, no report is spooled, a log line names the user."""
    queue_id = put(spool)
    assert queue(spool, "--retry-now", queue_id) == 0  # leaves a state file behind
    capsys.readouterr()
    assert queue(spool, "--delete", queue_id) == 0
    assert spool.queue_ids() == [] and not os.path.exists(spool.state_path(queue_id))
    [line] = [line for line in capsys.readouterr().err.splitlines() if "deleted" in line]
    assert queue_id in line and "<u@x.test>" in line and "no bounce" in line
    assert pwd.getpwuid(os.getuid()).pw_name in line


def test_retry_now_makes_a_deferred_entry_due(spool, capsys):
    """--retry-now: next_attempt becomes now, so netsmtp-send --due takes it."""
    queue_id = put(spool)
    envelope = Envelope.thaw(spool.entry_path(queue_id))
    envelope.attempts, envelope.next_attempt = 1, time.time() + 3600
    spool.write_state(queue_id, envelope.freeze_state())
    with CaptureServer() as smarthost:
        run_cli(send_main, ["--smarthost", smarthost.address, "--due", spool.path])
        assert smarthost.messages == []
        assert queue(spool, "--retry-now", queue_id) == 0
        assert run_cli(send_main, ["--smarthost", smarthost.address, "--smarthost-tls", "off",
                                   "--due", spool.path]) == 0
    assert smarthost.delivered_to() == ["u@x.test"]


def test_all_names_every_entry(spool, capsys):
    """ALL holds every entry."""
    ids = [put(spool), put(spool)]
    assert queue(spool, "--hold", "ALL") == 0
    assert all(e["held"] for e in listed(spool, capsys).values())
    assert sorted(listed(spool, capsys)) == sorted(ids)


def test_all_passes_over_entries_not_committed(spool, capsys):
    """ALL is every committed entry: one still being written (or cut by a crash) is not
    mail, so it is neither changed nor named, and the command still exits 0."""
    queue_id = put(spool)
    writer = spool.create(Envelope(sender="a@b.test", recipients=["u@x.test"],
                                   id="%s" % ("f" * 24), arrival=time.time()))
    try:
        writer.write(b"Subject: half\r\n")
        writer.flush()
        for action in ("--hold", "--release", "--retry-now", "--delete"):
            assert queue(spool, action, "ALL") == 0
            captured = capsys.readouterr()
            assert "f" * 24 not in captured.out + captured.err
        assert os.path.exists(writer.path) and not os.path.exists(spool.state_path("f" * 24))
        assert not os.path.exists(spool.entry_path(queue_id))
    finally:
        writer.close()


def test_unknown_ids_are_named_and_exit_1(spool, capsys):
    """An unknown (or malformed) id is named on stderr, the others are still done; exit 1."""
    queue_id = put(spool)
    assert queue(spool, "--hold", "0" * 24, queue_id, "../etc/passwd") == 1
    captured = capsys.readouterr()
    assert "%s: no such entry" % ("0" * 24) in captured.err
    assert "../etc/passwd: no such entry" in captured.err
    assert captured.out == "%s: held\n" % queue_id


def test_a_busy_entry_is_reported_and_skipped(spool, capsys):
    """An entry another process has claimed (netsmtp-send at work) is busy: skipped, exit 1."""
    queue_id = put(spool)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nsys.path.insert(0, %r)\n"
         "from netsmtp.spool import Spool\n"
         "with Spool(%r).claim(%r):\n    print('claimed', flush=True)\n    time.sleep(60)\n"
         % (ROOT, spool.path, queue_id)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "claimed\n"
        assert queue(spool, "--delete", queue_id) == 1
        assert "%s: busy" % queue_id in capsys.readouterr().err
        assert spool.queue_ids() == [queue_id]
    finally:
        holder.kill()
        holder.wait()
    assert queue(spool, "--delete", queue_id) == 0 and spool.queue_ids() == []
