"""Front ends of the queue: netsmtp-send and netsmtp-queue.

Parse options, call netsmtp.runner or read the spool, print one line per
message, return an exit code.  No delivery logic here.
"""

import json
import sys
import time

from .cli import (EX_TEMPFAIL, add_options, make_parser, options_from, setup_logging,
                  warn_about_secrets)
from .options import QUEUE, SEND, options_of

# Fewer messages than this finish before a progress bar would help.
PROGRESS_MIN = 20


class Progress:
    """A one-line bar under the output lines, drawn only on a terminal."""

    def __init__(self, total, stream, enabled):
        self.total, self.stream, self.enabled, self.done = total, stream, enabled, 0

    def line(self, text):
        self.done += 1
        if self.enabled:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        if self.enabled:
            width = 40
            filled = width * self.done // max(self.total, 1)
            self.stream.write("[%s%s] %d/%d" % ("#" * filled, "." * (width - filled),
                                                self.done, self.total))
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def send_main(argv=None, runner_class=None):
    """netsmtp-send: deliver spool entries; exit 0, 75 if any deferred, 1 on errors."""
    from .runner import QueueRunner
    from .spool import resolve
    parser = make_parser(SEND, (
        "Deliver spooled messages: each PATH is a spool entry (spool/ID.msg or "
        "spool/ID.state) or a spool directory for all its entries."))
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="spool/ID.msg, spool/ID.state or a spool directory")
    parser.add_argument("--due", action="store_true",
                        help="only entries whose next attempt time has come, oldest first")
    parser.add_argument("--dry-run", action="store_true",
                        help="say what each entry would do; change nothing")
    add_options(parser, options_of(SEND))
    args = parser.parse_args(argv)
    options = options_from(parser, args)
    setup_logging(options)
    warn_about_secrets(options)
    if options.recipients:
        from .recipients import TableError, current
        try:
            current(options)  # a bad table stops the run before any delivery
        except TableError as exc:
            parser.error(str(exc))
    try:
        runner = (runner_class or QueueRunner)(options, due_only=args.due, dry_run=args.dry_run)
    except ValueError as exc:
        parser.error(str(exc))

    entries, problems, spools = resolve(args.paths)
    for problem in problems:
        print("netsmtp-send: error: %s" % problem, file=sys.stderr)
    failed = bool(problems)
    if not args.dry_run:
        for spool in spools:
            try:
                spool.clean()
            except OSError as exc:
                print("netsmtp-send: error: %s: %s" % (spool.path, exc), file=sys.stderr)
                failed = True
    deferred = False
    out = sys.stdout
    progress = Progress(len(entries), out, out.isatty() and len(entries) >= PROGRESS_MIN)
    try:
        with runner:
            for outcome in runner.run(entries):
                progress.line(str(outcome))
                failed = failed or outcome.failed
                deferred = deferred or outcome.deferred
    finally:
        progress.close()
    return 1 if failed else EX_TEMPFAIL if deferred else 0


def queue_main(argv=None):
    """netsmtp-queue: list the queue like mailq, or as JSON; or hold, release, delete, retry."""
    from .spool import Spool
    parser = make_parser(QUEUE, (
        "List the messages in the spool, or change entries: hold, release, delete, retry now "
        "(ID... or ALL)."))
    add_options(parser, options_of(QUEUE))
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print a JSON list of entries")
    output.add_argument("--prometheus", action="store_true",
                        help="print Prometheus metrics for node_exporter's textfile collector")
    for action, what in (("hold", "keep entries from being sent until released"),
                         ("release", "let held entries be sent again"),
                         ("delete", "remove entries for good, with no bounce (logged)"),
                         ("retry_now", "make entries due now for netsmtp-send --due")):
        output.add_argument("--" + action.replace("_", "-"), nargs="+", metavar="ID",
                            dest=action, help=what + "; ALL for every entry")
    args = parser.parse_args(argv)
    options = options_from(parser, args)
    from .spool import misnamed
    if misnamed(options.spool):
        print("netsmtp-queue: error: %s" % misnamed(options.spool), file=sys.stderr)
        return 1
    spool = Spool(options.spool)
    for action in ("hold", "release", "delete", "retry_now"):
        if getattr(args, action):
            setup_logging(options)
            return control_main(spool, action, getattr(args, action))
    entries, broken = [], 0
    try:
        for queue_id, envelope in spool.envelopes():
            if isinstance(envelope, ValueError):
                print("netsmtp-queue: %s: unreadable entry: %s" % (queue_id, envelope),
                      file=sys.stderr)
                broken += 1
            else:
                entries.append(envelope)
    except OSError as exc:
        print("netsmtp-queue: error: %s: %s" % (options.spool, exc.strerror or exc),
              file=sys.stderr)
        return 1
    if args.prometheus:
        from .metrics import collect, format_metrics
        sys.stdout.write(format_metrics(collect(spool, entries)))
    elif args.json:
        json.dump([e.describe() for e in entries], sys.stdout, indent=1, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print_queue(entries, sys.stdout)
    return 1 if broken else 0


def control_main(spool, action, names):
    """Apply one queue-control action to each id; exit 0 if every one was done, else 1."""
    from .control import Busy, Unknown, control, queue_ids
    from .replies import printable
    try:
        ids = queue_ids(spool, names)
    except OSError as exc:
        print("%s: error: %s: %s" % (QUEUE, spool.path, exc.strerror or exc), file=sys.stderr)
        return 1
    failed = False
    for queue_id in ids:
        try:
            done = control(spool, action, queue_id)
        except Unknown:
            if queue_id not in names:
                continue  # ALL found it, but it is not mail yet (not committed) or gone
            print("%s: %s: no such entry" % (QUEUE, printable(queue_id)), file=sys.stderr)
        except Busy:
            print("%s: %s: busy (being sent), skipped" % (QUEUE, queue_id), file=sys.stderr)
        except (OSError, ValueError) as exc:
            print("%s: %s: %s" % (QUEUE, queue_id, printable(exc)), file=sys.stderr)
        else:
            print("%s: %s" % (queue_id, done))
            continue
        failed = True
    return 1 if failed else 0


def print_queue(entries, out):
    """The queue like sendmail's mailq: an entry, then a line per recipient."""
    from .replies import printable
    if not entries:
        out.write("Mail queue is empty\n")
        return
    out.write("%-24s %9s  %-19s  %s\n" % ("Queue ID", "Size", "Arrival", "Sender/Recipient"))
    recipients = 0
    for e in entries:
        out.write("%-24s %9d  %-19s  <%s>%s%s\n" % (
            e.id, e.size, _when(e.arrival), printable(e.sender),
            "  held" if e.held else "",
            "  attempts %d, next %s" % (e.attempts, _when(e.due_at)) if e.attempts else ""))
        for r in e.recipients:
            record = e.status[r]
            recipients += 1
            out.write("%57s %-9s <%s>%s\n" % ("", record.status, printable(r),
                                             "  (%s)" % printable(record.reply)
                                             if record.reply else ""))
    out.write("-- %d Kbytes in %d Request%s, %d recipient%s.\n" % (
        (sum(e.size for e in entries) + 1023) // 1024, len(entries),
        "" if len(entries) == 1 else "s", recipients, "" if recipients == 1 else "s"))


def _when(seconds):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"
