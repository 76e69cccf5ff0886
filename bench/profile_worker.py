#!/usr/bin/env python3
"""Where a prefork worker's CPU goes under `smtp-source -s 10 -d` (bench/README.md).

    python3 bench/profile_worker.py cpu       # CPU per message of the whole server
    python3 bench/profile_worker.py strace    # syscalls per message (strace -c -f)
    python3 bench/profile_worker.py pyspy     # on-CPU samples of the workers (py-spy)
    python3 bench/profile_worker.py cprofile  # cProfile of each worker, calls per message

Each mode starts `netsmtp --workers 4` (the default prefork pool) on a free
loopback port with a fresh spool, sends --messages 2 KB messages with
smtp-source over --sessions connections kept open, and prints its figures
per message.  Postfix can be measured the same way (cpu mode, --peer
postfix) for CPU per message side by side.
"""

import argparse
import collections
import glob
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from loads import smtp_source  # noqa: E402
from peers import PEERS, tree_cpu_seconds  # noqa: E402

PROFILED_WORKER = """
import cProfile, os, sys
from netsmtp import prefork
run = prefork.Worker.run
def profiled(self):
    profile = cProfile.Profile()
    profile.enable()
    try:
        return run(self)
    finally:
        profile.disable()
        profile.dump_stats(os.path.join(%r, "worker-%%d.prof" %% os.getpid()))
prefork.Worker.run = profiled
from netsmtp.cli import main
sys.argv[0] = "netsmtp"
sys.exit(main())
"""


def start(peer_name, workdir, profile_dir=None):
    peer = PEERS[peer_name]()
    if profile_dir is not None:
        command = peer.command

        def profiled(workdir):
            args = command(workdir)
            return [args[0], "-c", PROFILED_WORKER % profile_dir] + args[3:]
        peer.command = profiled
    peer.start(workdir)
    return peer


def workers(peer):
    return [int(p) for p in subprocess.run(
        ["pgrep", "-P", str(peer.root_pid)], capture_output=True, text=True).stdout.split()]


def cpu(args, workdir):
    peer = start(args.peer, workdir)
    try:
        smtp_source(peer.port, 200, args.sessions, True)  # warm: the pool has grown
        before = tree_cpu_seconds(peer.root_pid, split=True)
        elapsed = smtp_source(peer.port, args.messages, args.sessions, not args.per_connection)
        after = tree_cpu_seconds(peer.root_pid, split=True)
    finally:
        peer.stop()
    user, system = (1e6 * (b - a) / args.messages for a, b in zip(before, after, strict=True))
    print("%s: %.0f msg/s, CPU per message %.0f us (user %.0f, system %.0f) of every "
          "server process" % (args.peer, args.messages / elapsed, user + system, user, system))


def strace(args, workdir):
    peer = start(args.peer, workdir)
    try:
        smtp_source(peer.port, 200, args.sessions, True)
        out = os.path.join(workdir, "strace.txt")
        pids = workers(peer) + [peer.root_pid]
        tracer = subprocess.Popen(["strace", "-c", "-f", "-o", out,
                                   *[a for p in pids for a in ("-p", str(p))]],
                                  stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # strace attaches asynchronously; no readiness signal to wait on
        smtp_source(peer.port, args.messages, args.sessions, not args.per_connection)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
    finally:
        peer.stop()
    print("syscalls per message (%d messages, %d sessions):" % (args.messages, args.sessions))
    with open(out) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
                calls = int(fields[3])
                print("  %-16s %6.2f" % (fields[-1], calls / args.messages))
            elif len(fields) >= 5 and fields[-1] == "total":
                print("  %-16s %6.2f" % ("total", int(fields[3]) / args.messages))


def pyspy(args, workdir):
    peer = start(args.peer, workdir)
    out = os.path.join(workdir, "pyspy.txt")
    try:
        smtp_source(peer.port, 200, args.sessions, True)
        spy = subprocess.Popen(["py-spy", "record", "--subprocesses", "--nonblocking",
                                "-r", "500", "-f", "raw", "-o", out, "-p", str(peer.root_pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches asynchronously
        smtp_source(peer.port, args.messages, args.sessions, not args.per_connection)
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    finally:
        peer.stop()
    inclusive, own, total = collections.Counter(), collections.Counter(), 0
    with open(out) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = [frame.split(" (")[0] + " " + frame.rsplit("/", 1)[-1].rstrip(")")
                      for frame in stack.split(";")[1:]]  # the first is the process
            count = int(count)
            total += count
            for frame in set(frames):
                inclusive[frame] += count
            if frames:
                own[frames[-1]] += count
    print("py-spy: %d samples of on-CPU Python in the workers; share of samples" % total)
    print("%-60s %9s %9s" % ("function (file:line)", "inclusive", "own"))
    for frame, count in inclusive.most_common(args.top):
        print("%-60s %8.1f%% %8.1f%%" % (frame[:60], 100 * count / total,
                                         100 * own[frame] / total))


def cprofile(args, workdir):
    profile_dir = os.path.join(workdir, "profiles")
    os.makedirs(profile_dir)
    peer = start(args.peer, workdir, profile_dir)
    try:
        smtp_source(peer.port, args.messages, args.sessions, not args.per_connection)
    finally:
        peer.stop()
    stats = pstats.Stats(*glob.glob(os.path.join(profile_dir, "*.prof")))
    print("cProfile of all workers, %d messages: calls and us per message "
          "(profiled, so inflated)" % args.messages)
    print("%-58s %8s %9s %9s" % ("function", "calls", "own us", "incl us"))
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][3])
    for (path, line, name), (_, calls, own, incl, _) in rows[:args.top]:
        print("%-58s %8.2f %9.1f %9.1f" % (("%s:%d %s" % (os.path.basename(path), line, name))[:58],
                                          calls / args.messages, 1e6 * own / args.messages,
                                          1e6 * incl / args.messages))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("cpu", "strace", "pyspy", "cprofile"))
    parser.add_argument("--peer", default="netsmtp-prefork", choices=sorted(PEERS))
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--per-connection", action="store_true",
                        help="one message per connection (smtp-source without -d)")
    args = parser.parse_args()
    if args.mode in ("strace", "pyspy") and not shutil.which(args.mode.replace("pyspy", "py-spy")):
        parser.error("%s is not installed" % args.mode)
    workdir = tempfile.mkdtemp(prefix="netsmtp-profile-")
    os.chmod(workdir, 0o755)
    try:
        globals()[args.mode](args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
