"""The queue as Prometheus metrics, in node_exporter's textfile-collector format.

netsmtp is many processes (prefork, inetd), so it keeps no counters in
memory to scrape; the spool is the state.  `netsmtp-queue --prometheus`,
run from cron beside netsmtp-send, writes these lines to a .prom file that
node_exporter's textfile collector serves.
"""

import os
import time

from .envelope import DEFERRED, FAILED, PENDING
from .spool import ENTRY_NAME, MESSAGE_SUFFIX

ENTRY_STATES = ("queued", "held", "quarantined")
RECIPIENT_STATUSES = (PENDING, DEFERRED, FAILED)

# name -> (type, help, label); one table, in the order the lines are printed.
METRICS = {
    "netsmtp_queue_entries": (
        "gauge", "Messages in the spool, by state (queued, held, quarantined).", "state"),
    "netsmtp_queue_recipients": (
        "gauge", "Recipients of queued and held messages not yet final, by status.", "status"),
    "netsmtp_queue_oldest_seconds": (
        "gauge", "Age in seconds of the oldest message in the spool; 0 when it is empty.", None),
}


def is_held(envelope):
    """True when the entry is held by the queue control (netsmtp-queue --hold)."""
    return envelope.held


def collect(spool, envelopes, now=None):
    """{metric name: {label value or None: number}} for the spool and its thawed envelopes."""
    now = time.time() if now is None else now
    entries = dict.fromkeys(ENTRY_STATES, 0)
    recipients = dict.fromkeys(RECIPIENT_STATUSES, 0)
    oldest = None
    for envelope in envelopes:
        entries["held" if is_held(envelope) else "queued"] += 1
        for status in RECIPIENT_STATUSES:
            recipients[status] += len(envelope.recipients_in(status))
        if envelope.arrival and (oldest is None or envelope.arrival < oldest):
            oldest = envelope.arrival
    try:
        names = os.listdir(spool.quarantine_dir)
    except FileNotFoundError:
        names = []
    entries["quarantined"] = sum(1 for name in names
                                 if name.endswith(MESSAGE_SUFFIX) and ENTRY_NAME.match(name))
    return {"netsmtp_queue_entries": entries,
            "netsmtp_queue_recipients": recipients,
            "netsmtp_queue_oldest_seconds": {None: max(0.0, now - oldest) if oldest else 0}}


def format_metrics(values):
    """The text exposition format (version 0.0.4): HELP, TYPE, then the samples."""
    lines = []
    for name, (kind, help_text, label) in METRICS.items():
        lines += ["# HELP %s %s" % (name, help_text), "# TYPE %s %s" % (name, kind)]
        for key, number in values[name].items():
            sample = name if label is None else '%s{%s="%s"}' % (name, label, key)
            lines.append("%s %s" % (sample, _number(number)))
    return "\n".join(lines) + "\n"


def _number(value):
    return str(int(value)) if float(value).is_integer() else "%.3f" % value
