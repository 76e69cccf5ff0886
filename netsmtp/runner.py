"""The queue runner: claim each entry, deliver, record, bounce, remove.

What netsmtp-send does for each entry, under its claim (netsmtp.spool):
thaw it, try each pending recipient once, record every outcome, bounce
the recipients that failed for good (or whose time ran out), then either
remove the entry (every recipient delivered or bounced) or write its state
with the next attempt time (exponential backoff).
"""

import enum
import logging
import os
import time

from .bounce import spool_report
from .delivery import Routes
from .envelope import Envelope, Result, Status
from .lmtp import LMTPDelivery
from .maildir import MaildirDelivery
from .replies import printable
from .smarthost import SmarthostDelivery
from .spool import Busy, Incomplete, Spool

log = logging.getLogger(__name__)

STATE_ROOM = 1024  # octets per recipient a padded state keeps for its outcome


class Run(enum.StrEnum):
    """What a run did with one entry (Outcome.state); the values are what netsmtp-send prints."""

    SENT = "sent"                           # an attempt was made
    BUSY = "busy"                           # another sender had the claim
    GONE = "gone"                           # finished by another sender
    NOT_DUE = "not-due"                     # --due, and its time has not come
    HELD = "held"                           # netsmtp-queue --hold: never tried until released
    QUARANTINED = "quarantined"             # unreadable, moved aside
    ERROR = "error"                         # the spool could not be read or written
    PLANNED = "planned"                     # --dry-run
    WOULD_QUARANTINE = "would quarantine"   # --dry-run of an unreadable entry
    INCOMPLETE = "incomplete"               # never committed, young: skipped
    REMOVED = "removed"                     # never committed, older than session_timeout
    WOULD_REMOVE = "would remove"           # --dry-run of such an entry


class Outcome:
    """What happened to one entry in a run.

    state is a Run; results is {recipient: (status, Result or None)} (with
    --dry-run, (what it would do, a note)); removed is true when the entry
    left the spool.
    """

    def __init__(self, queue_id, state, envelope=None, results=None, note=None, removed=False):
        self.id, self.state, self.envelope, self.note = queue_id, state, envelope, note
        self.results = results or {}
        self.removed = removed

    @property
    def deferred(self):
        return any(status == Status.DEFERRED for status, _ in self.results.values())

    @property
    def failed(self):
        return self.state in (Run.QUARANTINED, Run.ERROR)

    def __str__(self):
        if not self.results:
            return "%s: %s%s" % (self.id, self.state, " (%s)" % self.note if self.note else "")
        return "%s: %s" % (self.id, "; ".join(
            "<%s> %s%s" % (printable(r), status, " (%s)" % printable(result) if result else "")
            for r, (status, result) in self.results.items()))


class QueueRunner:
    """Sends spool entries; one instance per run, closed at the end.

    Methods that may be overridden:
        deliver(envelope, recipients)  the delivery step: {recipient: Result};
                        the default routes each recipient to a Delivery

    Class variables that may be overridden:
        envelope_class  the Envelope subclass thawed for each entry
        deliveries      route name -> Delivery class; add your own here
        remove_batch    removals that share one directory fsync (see sync());
                        1 here, where file creation costs as much as an
                        fsync; raise it where fsync is slow (bench/README.md)

    Use as a context manager, or call close() to end the deliveries'
    connections.
    """

    envelope_class = Envelope
    deliveries = {"smarthost": SmarthostDelivery, "maildir": MaildirDelivery,
                  "lmtp": LMTPDelivery}
    remove_batch = 1

    def __init__(self, options, due_only=False, dry_run=False):
        self.options = options
        self.due_only = due_only
        self.dry_run = dry_run
        self.route = Routes(options)
        unknown = self.route.names() - set(self.deliveries)
        if unknown:
            raise ValueError("routes: unknown delivery %r (known: %s)" % (
                sorted(unknown)[0], ", ".join(sorted(self.deliveries))))
        self._deliveries = {}
        self._unsynced = []

    def delivery(self, name):
        """The Delivery for a route name, made on first use."""
        if name not in self._deliveries:
            self._deliveries[name] = self.deliveries[name](self.options)
        return self._deliveries[name]

    def deliver(self, envelope, recipients):
        """The delivery step: {recipient: Result} for each of recipients.

        The default groups recipients by route (self.route) and hands each
        group to that route's Delivery.  Override to deliver some other way;
        a recipient left out of the result is deferred.
        """
        groups = {}
        for recipient in recipients:
            groups.setdefault(self.route(recipient), []).append(recipient)
        results = {}
        for route, group in groups.items():
            results.update(self.delivery(route).deliver(envelope, group))
        return results

    def close(self):
        self.sync()
        for delivery in self._deliveries.values():
            delivery.close()
        self._deliveries.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- a run -----------------------------------------------------------------

    def run(self, entries):
        """Send entries [(Spool, id)]; yields an Outcome for each."""
        entries = list(entries)
        if self.due_only:
            entries = self.due(entries)
        for spool, queue_id in entries:
            yield self.send_entry(spool, queue_id)
        self.sync()

    def due(self, entries, now=None):
        """The entries whose next attempt has come, oldest first."""
        now = time.time() if now is None else now
        due = []
        for spool, queue_id in entries:
            try:
                envelope = self.envelope_class.thaw(spool.entry_path(queue_id))
                is_due = envelope.due_at <= now and not envelope.held
                arrival = float(envelope.arrival or 0)
            except Exception:  # gone, bad (quarantined when sent) or not committed
                due.append((0, spool, queue_id))  # one bad entry never stops the run
                continue
            if is_due:
                due.append((arrival, spool, queue_id))
        due.sort(key=lambda item: (item[0], item[2]))
        return [(spool, queue_id) for _, spool, queue_id in due]

    def send_entry(self, spool, queue_id):
        """Claim and send one entry by id; an Outcome, never an exception for bad data."""
        if self.dry_run:
            return self.plan(spool, queue_id)
        return self.claimed(spool, queue_id, lambda: self.envelope_class.thaw(
            spool.entry_path(queue_id)))

    def send(self, envelope):
        """Claim and send a thawed envelope (Envelope.send() comes here)."""
        def reload():
            envelope.load_state()
            if not os.path.exists(envelope.path):
                raise FileNotFoundError(envelope.path)
            return envelope
        spool = Spool(os.path.dirname(envelope.path) or ".")
        try:
            return self.claimed(spool, envelope.id, reload)
        finally:
            self.sync()

    def claimed(self, spool, queue_id, thaw):
        """Claim an entry, thaw it under the claim and make one attempt."""
        claim = spool.claim(queue_id)
        try:
            claim.acquire()
        except Busy:
            return Outcome(queue_id, Run.BUSY, note="claimed by another sender")
        outcome = None
        try:
            try:
                envelope = thaw()
            except FileNotFoundError:
                outcome = Outcome(queue_id, Run.GONE)
            except Incomplete as exc:
                outcome = self.incomplete(spool, queue_id, exc)
            except ValueError as exc:
                spool.quarantine(queue_id, exc)
                outcome = Outcome(queue_id, Run.QUARANTINED, note=str(exc))
            else:
                outcome = self.attempt(spool, envelope)
        except OSError as exc:
            log.error("%s: %s", queue_id, exc)
            outcome = Outcome(queue_id, Run.ERROR, note=printable(exc))
        except Exception as exc:
            log.exception("%s: internal error", queue_id)
            outcome = Outcome(queue_id, Run.ERROR, note="internal error: %s" % type(exc).__name__)
        finally:
            if outcome is not None and outcome.removed:
                self._unsynced.append((spool, queue_id, claim))
                if len(self._unsynced) >= self.remove_batch:
                    self.sync()
            else:
                claim.release()
        return outcome

    def incomplete(self, spool, queue_id, exc, now=None):
        """An entry never committed: skipped while its writer may live, removed after.

        No session outlives options.session_timeout, so an older one is the
        debris of a crash before its 250: never mail, even if it looks whole.
        """
        age = exc.age(now)
        if age < self.options.session_timeout:
            return Outcome(queue_id, Run.INCOMPLETE, note="not committed, %d seconds old; "
                           "skipped" % age)
        reason = "an entry never committed, %d seconds old" % age
        spool.remove_incomplete(queue_id, reason)
        return Outcome(queue_id, Run.REMOVED, note=reason)

    def sync(self):
        """Make the removals so far durable (one fsync per spool), then release their claims.

        Group commit: a claim is released only after a directory fsync that
        followed its removal, so another sender can never see a removed
        message come back; a crash before the fsync can only mean a message
        is sent again, never lost.
        """
        unsynced, self._unsynced = self._unsynced, []
        spools = {}
        for spool, queue_id, _ in unsynced:
            spools.setdefault(spool, []).append(queue_id)
        try:
            for spool, queue_ids in spools.items():
                spool.finish_removals(queue_ids)
        except OSError as exc:
            log.error("cannot sync the spool: %s", exc)
        finally:
            for _, _, claim in unsynced:
                claim.release()

    def attempt(self, spool, envelope, now=None):
        """One delivery attempt of a claimed entry, recorded in the spool."""
        now = time.time() if now is None else now
        if envelope.held:
            return Outcome(envelope.id, Run.HELD, envelope, note="release with netsmtp-queue "
                           "--release")
        if self.due_only and envelope.due_at > now:
            return Outcome(envelope.id, Run.NOT_DUE, envelope)
        pending = envelope.recipients_in(Status.PENDING, Status.DEFERRED)
        results = {}
        if pending and not self.state_writable(spool, envelope):
            return Outcome(envelope.id, Run.ERROR, envelope,
                           note="not sent: the spool has no room to record the outcome")
        if pending:
            try:
                results = self.deliver(envelope, pending)
            except Exception:
                log.exception("%s: delivery failed", envelope.id)
                results = {}
            missing = Result(451, "4.3.0 local error in delivery")
            results = {r: results.get(r, missing) for r in pending}
            envelope.attempts += 1
            envelope.last_attempt = now
        deferred = []
        for recipient, result in results.items():
            record = envelope.status[recipient]
            record.status, record.reply, record.remote = result.status, result, result.remote
            if result.status == Status.DEFERRED:
                deferred.append(recipient)
                envelope.last_error = str(result)
            log.debug("%s: <%s> %s: %s", envelope.id, printable(recipient), result.status,
                     printable(result))
        if deferred and now - (envelope.arrival or now) >= self.options.max_queue_lifetime:
            days = self.options.max_queue_lifetime / 86400
            for recipient in deferred:
                # RFC 3463: 4.4.7, delivery time expired.
                record = envelope.status[recipient]
                record.status, record.reply = Status.FAILED, Result(
                    record.reply.code, "4.4.7 message expired after %g days in the queue; "
                    "last error: %s" % (days, record.reply), record.reply.remote)
            deferred = []
        if envelope.sender and envelope.recipients_in(Status.FAILED):
            # Record the deliveries first, so a failing bounce repeats none.
            self.record_state(spool, envelope)
        self.bounce(spool, envelope, now)
        self.report(spool, envelope, results, now)
        if envelope.finished:
            spool.unlink_message(envelope.id)  # made durable by sync()
        else:
            if deferred:
                envelope.next_attempt = self.next_attempt(envelope, now)
            self.record_state(spool, envelope)
        outcome = {r: (envelope.status[r].status, results.get(r)) for r in envelope.recipients
                   if r in results or envelope.status[r].status in (Status.BOUNCED, Status.DROPPED)}
        return Outcome(envelope.id, Run.SENT, envelope, outcome, removed=envelope.finished)

    def state_writable(self, spool, envelope):
        """False when a full spool could not record what a delivery did.

        Below options.spool_min_free the state is written once before
        sending: if that fails nothing is sent, for a delivery whose outcome
        cannot be recorded would be repeated by the next run.
        """
        try:
            if spool.free_space() >= self.options.spool_min_free:
                return True
            # Padded, so the outcome fits in place even if the disk fills meanwhile.
            room = STATE_ROOM * len(envelope.recipients)
            spool.write_state(envelope.id, envelope.freeze_state() + b" " * room)
            return True
        except OSError as exc:
            log.error("%s: not sent: cannot record its state: %s", envelope.id, exc)
            return False

    def record_state(self, spool, envelope):
        """Write the entry's state; on a full disk, into the room a padded state kept."""
        data = envelope.freeze_state()
        try:
            spool.write_state(envelope.id, data)
        except OSError as exc:
            try:
                written = spool.overwrite_state(envelope.id, data)
            except OSError:
                written = False
            if not written:
                raise
            log.warning("%s: state written in place: %s", envelope.id, exc)

    def next_attempt(self, envelope, now):
        """Exponential backoff: retry_initial doubling to retry_max, never past expiry."""
        delay = min(self.options.retry_initial * 2 ** max(envelope.attempts - 1, 0),
                    self.options.retry_max)
        expiry = (envelope.arrival or now) + self.options.max_queue_lifetime
        return max(min(now + delay, expiry), now)

    def bounce(self, spool, envelope, now):
        """Bounce the recipients that failed for good, or drop them when no report is due.

        No report goes to <> (RFC 5321 section 4.5.5: never a notification
        about a notification) or about a recipient whose NOTIFY leaves out
        FAILURE (RFC 3461 section 5.2.6); such a failure is logged and the
        recipient dropped.
        """
        failed = envelope.recipients_in(Status.FAILED)
        if not failed:
            return
        reported = []
        for recipient in failed:
            record = envelope.status[recipient]
            if envelope.sender and record.wants("FAILURE"):
                reported.append(record)
                continue
            log.warning("%s: <%s> failed, not bounced (%s): %s", envelope.id,
                        printable(recipient), "sender is <>" if not envelope.sender else
                        "NOTIFY=%s" % ",".join(record.notify), printable(record.reply))
            record.status = Status.DROPPED
        if not reported:
            return
        for record in reported:
            record.reply = record.reply or Result(500, "5.0.0 failed")
        bounce_id = self.spool_report(spool, envelope, "failed", reported, now)
        log.info("%s: bounced %s to <%s> as %s", envelope.id,
                 ",".join("<%s>" % printable(r.address) for r in reported),
                 printable(envelope.sender), bounce_id)
        for record in reported:
            record.status = Status.BOUNCED

    def report(self, spool, envelope, results, now):
        """Send the delay, success and expansion reports now due (RFC 3461), each only once.

        The state records a report before it is spooled: a crash in between
        loses that report, but a retry never sends a second one.
        """
        if not envelope.sender:
            return
        due = {}
        for recipient in envelope.recipients:
            record = envelope.status[recipient]
            action = self.report_due(envelope, record, recipient in results, now)
            if action is not None:
                due.setdefault(action, []).append(record)
                record.reports.add(action)
        if envelope.expanded and "expanded" not in envelope.reports:
            from .envelope import Recipient
            due["expanded"] = [Recipient(e["address"], orcpt=e.get("orcpt"))
                               for e in envelope.expanded]
            envelope.reports.add("expanded")
        if not due:
            return
        spool.write_state(envelope.id, envelope.freeze_state())
        for action, records in due.items():
            report_id = self.spool_report(spool, envelope, action, records, now)
            log.info("%s: %s report about %s to <%s> as %s", envelope.id, action,
                     ",".join("<%s>" % printable(r.address) for r in records),
                     printable(envelope.sender), report_id)

    def report_due(self, envelope, record, tried, now):
        """The report action due about one recipient now, or None.

        delivered: final delivery (Maildir) with NOTIFY=SUCCESS; relayed: a
        smarthost without DSN took it (one with DSN reports itself, having
        got NOTIFY); delayed: still deferred after delay_warning, unless
        NOTIFY leaves out DELAY.
        """
        if record.status == Status.DELIVERED and tried and record.notify is not None \
                and "SUCCESS" in record.notify:
            delivery = self._deliveries.get(self.route(record.address))
            if getattr(delivery, "final", False):
                return "delivered"
            return None if getattr(delivery, "relays_dsn", False) else "relayed"
        warning = self.options.delay_warning
        if record.status == Status.DEFERRED and warning is not None and record.wants("DELAY") \
                and "delayed" not in record.reports and now - (envelope.arrival or now) >= warning:
            return "delayed"
        return None

    def spool_report(self, spool, envelope, action, records, now):
        """Spool one report (netsmtp.bounce) from <> to the sender; returns its id."""
        return spool_report(spool, envelope, action, records, self.options.hostname, now,
                            full_limit=self.options.bounce_size_limit,
                            retry_until=(envelope.arrival or now) + self.options.max_queue_lifetime)

    def plan(self, spool, queue_id, now=None):
        """What sending would do, changing nothing (--dry-run)."""
        now = time.time() if now is None else now
        try:
            envelope = self.envelope_class.thaw(spool.entry_path(queue_id))
        except FileNotFoundError:
            return Outcome(queue_id, Run.GONE)
        except Incomplete as exc:
            if exc.age(now) < self.options.session_timeout:
                return Outcome(queue_id, Run.INCOMPLETE, note="not committed; skipped")
            return Outcome(queue_id, Run.WOULD_REMOVE, note="never committed, %d seconds old"
                           % exc.age(now))
        except ValueError as exc:
            return Outcome(queue_id, Run.WOULD_QUARANTINE, note=str(exc))
        if envelope.held:
            return Outcome(queue_id, Run.HELD, envelope)
        if self.due_only and envelope.due_at > now:
            return Outcome(queue_id, Run.NOT_DUE, envelope)
        results = {}
        for recipient in envelope.recipients_in(Status.PENDING, Status.DEFERRED):
            results[recipient] = ("would send", self.delivery(self.route(recipient)).describe())
        for recipient in envelope.recipients_in(Status.FAILED):
            results[recipient] = ("would bounce", envelope.status[recipient].reply)
        return Outcome(queue_id, Run.PLANNED, envelope, results)

