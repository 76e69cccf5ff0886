#!/usr/bin/env python3
"""netsmtp-send throughput to Postfix's smtp-sink over one reused connection.

Spools N messages, then times one queue run (QueueRunner, as netsmtp-send
runs it): each message is claimed (flock), sent, and removed durably
(unlink, then a directory fsync before its claim is released).  Two rows:
one fsync per removal (the default), and group commit (QueueRunner.remove_batch
= 32 removals per fsync).  Prints the median of 3 runs each.

    python3 bench/send_throughput.py [--count N] [--size BYTES] [--dir DIR]
"""

import argparse
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from netsmtp.envelope import Envelope  # noqa: E402
from netsmtp.options import Options  # noqa: E402
from netsmtp.runner import QueueRunner  # noqa: E402
from netsmtp.spool import Spool, new_queue_id, resolve  # noqa: E402


def start_sink():
    sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    user = ["-u", "root"] if os.geteuid() == 0 else []
    proc = subprocess.Popen([sink, *user, "127.0.0.1:%d" % port, "100"])
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return proc, port
        except OSError:
            time.sleep(0.01)
    raise SystemExit("smtp-sink did not start")


def one_run(directory, count, size, port, batch):
    spool = Spool(tempfile.mkdtemp(dir=directory))
    spool.prepare()
    body = b"Received: from bench\r\nSubject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * (size // 78)
    for _ in range(count):
        spool.add(Envelope(sender="a@b.test", recipients=["u@x.test"], id=new_queue_id(),
                           arrival=time.time()), body)
    options = Options(spool=spool.path, hostname="bench.test",
                      smarthost="127.0.0.1:%d" % port, smarthost_tls="off")
    started = time.perf_counter()
    entries, _, _ = resolve([spool.path])
    runner = QueueRunner(options)
    runner.remove_batch = batch
    with runner:
        delivered = sum(o.state == "sent" and not o.deferred for o in runner.run(entries))
    elapsed = time.perf_counter() - started
    assert delivered == count and spool.queue_ids() == [], "not all delivered"
    shutil.rmtree(spool.path)
    return count / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--dir", default=".")
    args = parser.parse_args()
    logging.getLogger("netsmtp").setLevel(logging.WARNING)
    sink, port = start_sink()
    print("%-10s %8s %-22s %9s %8s" % ("size", "messages", "removal", "msg/s", "ms/msg"))
    try:
        for batch in (1, 32):
            rate = statistics.median(one_run(args.dir, args.count, args.size, port, batch)
                                     for _ in range(3))
            print("%-10s %8d %-22s %9.0f %8.2f" % (
                "%d B" % args.size, args.count, "fsync each" if batch == 1 else
                "group commit of %d" % batch, rate, 1000 / rate))
    finally:
        sink.kill()
        sink.wait()


if __name__ == "__main__":
    main()
