"""Torn writes: a spool entry cut anywhere by a crash is never sent and never listed.

The entries are real ones, written by a netsmtp server over SMTP; each cut
is what a crash before the entry's fsync may leave under its final name.
"""

import json
import os
import random
import smtplib
import time

import pytest
from conftest import spooled
from smarthost import CaptureServer, run_cli

from netsmtp.queue_cli import queue_main, send_main
from netsmtp.spool import COMMIT_LINE_SIZE, WRITE_BUFFER, Spool

LARGE_CUTS = 150  # random cuts of the entry that spans several writes


@pytest.fixture
def smarthost():
    with CaptureServer() as server:
        yield server


@pytest.fixture
def entries(server):
    """Two real entries: {name: bytes}, a small one and one over the write buffer."""
    client = smtplib.SMTP("127.0.0.1", server.port, timeout=30)
    client.ehlo("c.test")
    client.sendmail("a@b.test", ["u@mx.test", "v@mx.test"], b"Subject: small\r\n\r\nhello\r\n")
    large = b"Subject: large\r\n\r\n" + (b"x" * 70 + b"\r\n") * (WRITE_BUFFER // 72 + 200)
    client.sendmail("a@b.test", ["u@mx.test"], large)
    client.quit()
    assert server.stop() == 0
    spool = Spool(server.spool)
    names = spooled(spool)
    assert len(names) == 2
    found = {}
    for name in names:
        with open(os.path.join(spool.path, name), "rb") as f:
            found[name] = f.read()
    return found


def cut_spools(root, entries):
    """A spool directory per cut of each entry: [(directory, name, cut)]."""
    rng = random.Random(1105)
    made = []
    for name, data in sorted(entries.items(), key=lambda item: len(item[1])):
        if len(data) < WRITE_BUFFER:
            cuts = range(len(data))
        else:
            cuts = sorted({0, COMMIT_LINE_SIZE - 1, COMMIT_LINE_SIZE, WRITE_BUFFER,
                           len(data) - 2, len(data) - 1,
                           *rng.sample(range(len(data)), LARGE_CUTS)})
        for cut in cuts:
            spool = Spool(os.path.join(root, "%s-%d" % (name[:24], cut)))
            spool.prepare()
            with open(spool.entry_path(name[:24]), "wb") as f:
                f.write(data[:cut])
            made.append((spool, name, cut))
    return made


def test_every_cut_is_never_sent_nor_listed(tmp_path, entries, smarthost, capsys):
    """Every prefix of a real entry, the one missing only its last CRLF included, is
    skipped while young and removed once older than --session-timeout; never sent,
    never listed.  The whole entries, as a control, are sent."""
    cuts = cut_spools(str(tmp_path / "cuts"), entries)
    assert any(len(entries[name]) - cut == 2 for _, name, cut in cuts)
    assert len(cuts) > 600
    for spool, _, _ in cuts:
        assert run_cli(queue_main, ["--spool", spool.path, "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == []
    send = ["--smarthost", smarthost.address, "--smarthost-tls", "off"]
    assert run_cli(send_main, send + [spool.path for spool, _, _ in cuts]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(cuts) and all(": incomplete (" in line for line in lines)
    assert smarthost.messages == []
    assert all(os.path.exists(spool.entry_path(name[:24])) for spool, name, _ in cuts)

    old = time.time() - 3601
    for spool, name, _ in cuts:
        os.utime(spool.entry_path(name[:24]), (old, old))
    assert run_cli(send_main, send + [spool.path for spool, _, _ in cuts]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == len(cuts)
    assert all(": removed (an entry never committed" in line for line in lines)
    assert err.count("WARNING removed ") == len(cuts)
    assert smarthost.messages == []
    assert all(spooled(spool) == [] for spool, _, _ in cuts)

    whole = Spool(str(tmp_path / "whole"))
    whole.prepare()
    for name, data in entries.items():
        with open(os.path.join(whole.path, name), "wb") as f:
            f.write(data)
    assert run_cli(queue_main, ["--spool", whole.path, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert run_cli(send_main, send + [whole.path]) == 0
    delivered = sorted(m.data for m in smarthost.messages)
    assert [len(d) for d in delivered] == sorted(
        len(data) - data.index(b"\nReceived: ") - 1 for data in entries.values())


@pytest.mark.parametrize("where", ["envelope", "message", "last octet"])
def test_committed_entry_that_changed_is_quarantined(tmp_path, entries, smarthost, capsys, where):
    """A committed entry whose checksum no longer matches is quarantined, kept, never sent."""
    name, data = min(entries.items(), key=lambda item: len(item[1]))
    offset = {"envelope": COMMIT_LINE_SIZE + 10, "message": data.index(b"hello"),
              "last octet": len(data) - 1}[where]
    damaged = bytearray(data)
    damaged[offset] ^= 0x20
    spool = Spool(str(tmp_path / "damaged"))
    spool.prepare()
    with open(os.path.join(spool.path, name), "wb") as f:
        f.write(damaged)
    assert run_cli(queue_main, ["--spool", spool.path]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert run_cli(send_main, ["--smarthost", smarthost.address, "--smarthost-tls", "off",
                               spool.path]) == 1
    assert "quarantined (checksum mismatch" in capsys.readouterr().out
    assert smarthost.messages == [] and spooled(spool) == []
    with open(os.path.join(spool.quarantine_dir, name), "rb") as f:
        assert f.read() == damaged


def test_committed_entry_whose_commit_line_changed_is_quarantined(tmp_path, entries, smarthost,
                                                                  capsys):
    """A flipped octet anywhere in a committed entry's commit line (a size digit made
    larger included, which looks like a cut) is quarantined and kept, never removed as
    debris, however old."""
    name, data = min(entries.items(), key=lambda item: len(item[1]))
    spools = []
    for offset in range(COMMIT_LINE_SIZE):
        for flip in (0x01, 0x20):
            damaged = bytearray(data)
            damaged[offset] ^= flip
            spool = Spool(str(tmp_path / ("damaged-%d-%d" % (offset, flip))))
            spool.prepare()
            path = os.path.join(spool.path, name)
            with open(path, "wb") as f:
                f.write(damaged)
            old = time.time() - 3601
            os.utime(path, (old, old))
            spools.append((spool, bytes(damaged)))
    for spool, _ in spools:
        assert run_cli(queue_main, ["--spool", spool.path]) == 1
        assert "unreadable entry" in capsys.readouterr().err
    assert run_cli(send_main, ["--smarthost", smarthost.address, "--smarthost-tls", "off",
                               *(spool.path for spool, _ in spools)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(spools) and all(": quarantined (" in line for line in lines)
    assert smarthost.messages == []
    for spool, damaged in spools:
        assert spooled(spool) == []
        with open(os.path.join(spool.quarantine_dir, name), "rb") as f:
            assert f.read() == damaged
