#!/usr/bin/env python3
"""Accept-path cost: spool entries durably written per second (median of 3 runs).

Each entry is what a session does from DATA to the 250: create the entry
under its final name, write the envelope line and the message, write the
commit line, one fsync (netsmtp.spool).

    python3 bench/spool_write.py [--count N] [--dir DIR]

DIR should be on the disk the spool will live on (default: a temporary
directory under the current one).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from netsmtp.envelope import Envelope  # noqa: E402
from netsmtp.spool import Spool, new_queue_id  # noqa: E402

SIZES = (1_000, 10_000, 100_000)


def one_run(directory, count, size):
    spool = Spool(tempfile.mkdtemp(dir=directory))
    spool.prepare()
    body = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * (size // 78)
    started = time.perf_counter()
    for _ in range(count):
        envelope = Envelope(sender="a@b.test", recipients=["u@x.test"], id=new_queue_id(),
                            arrival=time.time())
        writer = spool.create(envelope)
        try:
            writer.write(b"Received: from bench\r\n")
            writer.write(body)
            writer.commit()
        finally:
            writer.close()
    elapsed = time.perf_counter() - started
    shutil.rmtree(spool.path)
    return count / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--dir", default=".")
    args = parser.parse_args()
    print("%-10s %12s %12s" % ("size", "entries/s", "ms/entry"))
    for size in SIZES:
        rate = statistics.median(one_run(args.dir, args.count, size) for _ in range(3))
        print("%-10s %12.0f %12.2f" % ("%d B" % size, rate, 1000 / rate))


if __name__ == "__main__":
    main()
