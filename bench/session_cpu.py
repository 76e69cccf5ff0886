#!/usr/bin/env python3
"""The Python side of a message: CPU per message, per connection and per command.

Drives netsmtp's Session in this process with the bytes smtp-source sends
(HELO, then MAIL, RCPT, DATA and a 2 KB message per message, then QUIT),
one command per read as smtp-source waits for each reply, into a real
spool (real files, real fsync) and the daemon's logging (one line per
message and per connection, to a file).  No sockets, so what is measured
is the session's own work plus its file system calls:

    python3 bench/session_cpu.py            # CPU per message and per connection
    python3 bench/session_cpu.py --profile  # cProfile: where a message's time goes

--dir should be on the disk the spool will live on (default: a temporary
directory under the current one).
"""

import argparse
import cProfile
import logging
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from netsmtp.cli import setup_logging  # noqa: E402
from netsmtp.options import Options  # noqa: E402
from netsmtp.session import Session  # noqa: E402
from netsmtp.spool import Spool  # noqa: E402

BODY = (b"From: <sender@client.test>\r\nTo: <user@bench.test>\r\n"
        b"Date: Tue,  1 Dec 2026 09:48:50 +0000 (UTC)\r\n"
        b"Message-Id: <038f.0003.0001@client.test>\r\n\r\n"
        + b"".join(b"%d" % i + b"X" * (78 - len(b"%d" % i)) + b"\r\n" for i in range(1, 27))
        + b".\r\n")
MESSAGE = [b"MAIL FROM:<sender@client.test>\r\n", b"RCPT TO:<user@bench.test>\r\n",
           b"DATA\r\n", BODY]


class Script:
    """read1() hands out one scripted chunk per call, as a client that waits for replies."""

    def __init__(self, chunks):
        self.chunks = iter(chunks)

    def read1(self, size):
        return next(self.chunks, b"")


class Sink:
    def __init__(self):
        self.octets = 0

    def write(self, data):
        self.octets += len(data)

    def flush(self):
        pass


def session(options, spool, messages):
    chunks = [b"HELO client.test\r\n", *MESSAGE * messages, b"QUIT\r\n"]
    Session(Script(chunks), Sink(), peer="127.0.0.1", options=options, spool=spool).handle()


def cpu_of(run):
    started = time.process_time()
    run()
    return time.process_time() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=".")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-fsync", action="store_true",
                        help="skip fsync (with --dir /dev/shm: the Python side alone)")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    if args.no_fsync:
        os.fsync = lambda fd: None
    workdir = tempfile.mkdtemp(prefix="netsmtp-session-cpu-", dir=args.dir)
    try:
        options = Options(spool=os.path.join(workdir, "spool"), hostname="mx.bench.test",
                          local_domains="bench.test", max_messages=0,
                          max_session_recipients=0)
        spool = Spool(options.spool)
        spool.prepare()
        log_file = open(os.path.join(workdir, "log"), "w")
        sys.stderr, stderr = log_file, sys.stderr
        try:
            setup_logging(options)
        finally:
            sys.stderr = stderr

        def clear():
            for name in os.listdir(spool.path):
                if name.endswith(".msg"):
                    os.unlink(os.path.join(spool.path, name))

        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            session(options, spool, args.messages)
            profile.disable()
            clear()
            stats = pstats.Stats(profile)
            print("cProfile of one session of %d messages: per message, calls and us "
                  "(profiled, so inflated)" % args.messages)
            print("%-58s %7s %8s %8s" % ("function", "calls", "own us", "incl us"))
            rows = sorted(stats.stats.items(), key=lambda item: -item[1][3])
            for (path, line, name), (_, calls, own, incl, _) in rows[:args.top]:
                label = "%s:%d %s" % (os.path.basename(path), line, name)
                print("%-58s %7.2f %8.1f %8.1f" % (label[:58], calls / args.messages,
                                                   1e6 * own / args.messages,
                                                   1e6 * incl / args.messages))
            return
        per_message, per_connection = [], []
        for _ in range(args.runs):
            spent = cpu_of(lambda: session(options, spool, args.messages))
            clear()
            per_message.append(1e6 * spent / args.messages)
            spent = cpu_of(lambda: [session(options, spool, 0)
                                    for _ in range(args.connections)])
            per_connection.append(1e6 * spent / args.connections)
        for label, values in (("per message (reused connection)", per_message),
                              ("per connection (HELO, QUIT)", per_connection)):
            print("CPU %-32s median %6.1f us  (min %.1f, max %.1f, %d runs)" % (
                label, statistics.median(values), min(values), max(values), len(values)))
    finally:
        logging.getLogger("netsmtp").handlers[:] = []
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
