"""Queue control: hold, release, delete and retry entries, as postsuper and postqueue do.

Each change is made under the entry's claim (netsmtp.spool.Claim), so it is
safe while netsmtp-send runs: an entry being sent is Busy and left alone.
Each is durable (the state file or the removal fsync'd) before the call
returns.  A held entry is never sent (netsmtp.runner) until it is released;
a deleted one is gone for good, with no bounce, and a log line says who
deleted what.
"""

import logging
import os
import pwd
import time

from .replies import printable
from .spool import ENTRY_NAME, MESSAGE_SUFFIX, Busy, Incomplete

log = logging.getLogger(__name__)

ACTIONS = ("hold", "release", "delete", "retry_now")
ALL = "ALL"


class Unknown(Exception):
    """No such entry in the spool (or not one that was ever committed)."""


def queue_ids(spool, names):
    """The entry ids that names stand for, ALL for every entry, in order, once each."""
    ids = []
    for name in names:
        for queue_id in (spool.queue_ids() if name == ALL else [name]):
            if queue_id not in ids:
                ids.append(queue_id)
    return ids


def who():
    """The user running this command, and the one behind sudo if any."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = "uid %d" % os.getuid()
    sudo = os.environ.get("SUDO_USER")
    return "%s (via sudo by %s)" % (user, printable(sudo)) if sudo else user


def control(spool, action, queue_id, now=None, envelope_class=None):
    """Apply action (one of ACTIONS) to one entry; returns a few words on what was done.

    Raises Unknown for an id that is not an entry, Busy when another
    process holds its claim, ValueError for an entry that cannot be read.
    """
    if action not in ACTIONS:
        raise ValueError("unknown action %r" % action)
    if not ENTRY_NAME.match(queue_id + MESSAGE_SUFFIX):
        raise Unknown(queue_id)
    if envelope_class is None:
        from .envelope import Envelope as envelope_class
    claim = spool.claim(queue_id)
    claim.acquire()  # Busy propagates: the entry is being sent or changed
    try:
        try:
            envelope = envelope_class.thaw(spool.entry_path(queue_id))
        except (FileNotFoundError, Incomplete):
            raise Unknown(queue_id) from None
        if action == "delete":
            spool.unlink_message(queue_id)
            spool.finish_removals([queue_id])
            log.warning("%s: deleted by %s, no bounce: from <%s> to %s, %s octets", queue_id,
                        who(), printable(envelope.sender),
                        ",".join("<%s>" % printable(r) for r in envelope.recipients),
                        envelope.size)
            return "deleted"
        if action == "hold":
            envelope.held, done = True, "held"
        elif action == "release":
            envelope.held, done = False, "released"
        else:
            envelope.next_attempt, done = time.time() if now is None else now, "due now"
        spool.write_state(queue_id, envelope.freeze_state())
        log.info("%s: %s by %s", queue_id, done, who())
        return done
    finally:
        claim.release()


__all__ = ["ACTIONS", "ALL", "Busy", "Unknown", "control", "queue_ids"]
