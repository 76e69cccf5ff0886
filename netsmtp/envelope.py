"""The envelope: who sent a message to whom, how, and when.

The session builds one per transaction; the spool freezes it as one line of
JSON in front of the raw message (after the entry's commit line, see
netsmtp.spool), and Envelope.thaw() gives it back as a live
object whose send() delivers it.  Delivery state (each recipient's status,
attempts, next attempt, last error) lives in ID.state beside it, so the
message file is written once.  JSON only: thawing a spool file can never
run code.
"""

import enum
import json
import math
import os
import re
from collections import namedtuple

from . import dsn as dsn_params
from .spool import check_entry

# 1: the entry is renamed into place whole; 2: it has a commit line
# (netsmtp.spool); 3: DSN requests (dsn, expanded).  Every older version
# stays readable: a missing field means what it meant before it existed.
SCHEMA_VERSION = 3
# An envelope line (and a state) is bounded by the session's limits: at
# most MAX_RECIPIENTS recipients (options refuse a larger max_recipients,
# and alias targets count), each with its path (256 octets), DSN request
# and, in the state, its last reply within RECIPIENT_BOUND.  So a message
# that got 250 always thaws; anything longer is not ours.
MAX_RECIPIENTS = 10_000
RECIPIENT_BOUND = 4096
MAX_ENVELOPE_LINE = 64 * 1024 + MAX_RECIPIENTS * RECIPIENT_BOUND
MAX_HEADER_LINE = 64 * 1024
NoneType = type(None)
# json.dumps with arguments builds an encoder per call; one per process will do.
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


class Status(enum.StrEnum):
    """Where a recipient stands; the values are the spool's JSON strings.

    A message leaves the spool when every recipient is final: delivered,
    bounced, or dropped (failed, but the sender was <>, which is never
    bounced).  FAILED lasts only until the bounce is spooled.
    """

    PENDING = "pending"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    FAILED = "failed"
    BOUNCED = "bounced"
    DROPPED = "dropped"


PENDING, DEFERRED, DELIVERED, FAILED, BOUNCED, DROPPED = Status
FINAL = frozenset((DELIVERED, BOUNCED, DROPPED))
STATUSES = frozenset(Status)


class Result(namedtuple("Result", "code text remote", defaults=(None,))):
    """An SMTP reply for one recipient: code (int) and text (with the enhanced code).

    remote names the server that gave it (a report's Remote-MTA), None when
    netsmtp made it up itself; it is no part of the reply's text.
    """

    @property
    def status(self):
        if 200 <= self.code < 300:
            return DELIVERED
        return FAILED if 500 <= self.code < 600 else DEFERRED

    @classmethod
    def parse(cls, reply):
        """The Result of a reply line as str() wrote it ("451 4.7.1 later")."""
        code, _, text = reply.partition(" ")
        return cls(int(code) if code.isdigit() else 500, text)

    def __str__(self):
        return "%d %s" % (self.code, self.text)


class Recipient:
    """One recipient's record in the queue.

    address  the forward path, as accepted
    status   a Status
    reply    the last Result for it (delivery or expiry), or None
    notify   its DSN NOTIFY (RFC 3461 section 4.1) as a tuple, None if not given
    orcpt    its DSN ORCPT ("rfc822;xtext") as given, None if not given
    reports  the DSN reports already sent about it ("delayed", "delivered",
             "relayed"), so a retry or a crash never sends one twice
    remote   the server that gave the last reply, None if netsmtp made it

    A plain class, not a dataclass: importing dataclasses (and with it
    inspect) would cost every --stdin start about 5 ms (bench/README.md).
    """

    FIELDS = ("address", "status", "reply", "notify", "orcpt", "reports", "remote")

    def __init__(self, address, status=Status.PENDING, reply=None, notify=None, orcpt=None,
                 reports=None, remote=None):
        self.address, self.status, self.reply = address, status, reply
        self.notify, self.orcpt, self.remote = notify, orcpt, remote
        self.reports = set() if reports is None else reports

    def _values(self):
        return tuple(getattr(self, name) for name in self.FIELDS)

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # mutable, as a dataclass without frozen=True

    def __repr__(self):
        return "Recipient(%s)" % ", ".join(
            "%s=%r" % (name, getattr(self, name)) for name in self.FIELDS)

    @property
    def final(self):
        return self.status in FINAL

    def to_json(self):
        """The JSON form of ID.state (and of netsmtp-queue --json, which adds notify and orcpt)."""
        return {"address": self.address, "status": str(self.status),
                "error": None if self.reply is None else str(self.reply),
                "reports": sorted(self.reports), "remote_mta": self.remote}

    def wants(self, word):
        """True when a report of kind word (SUCCESS, FAILURE, DELAY) is due by its NOTIFY."""
        return dsn_params.wants(self.notify, word)

    def load(self, item):
        """Take the delivery state of a JSON item of ID.state; ValueError if bad."""
        error = item.get("error")
        if item["status"] not in STATUSES or not isinstance(error, (str, NoneType)):
            raise ValueError("recipient status %r" % (item["status"],))
        reports, remote = item.get("reports", []), item.get("remote_mta")
        if not isinstance(reports, list) or not all(isinstance(r, str) for r in reports) or \
                not isinstance(remote, (str, NoneType)):
            raise ValueError("recipient reports %r" % (reports,))
        self.status = Status(item["status"])
        self.reply = None if error is None else Result.parse(error)
        self.reports = set(reports)
        self.remote = remote
        if self.reply is not None:
            self.reply = self.reply._replace(remote=remote)



def _time(value):
    """True for a time the queue can compare: a finite number (not a bool), or None."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and math.isfinite(value))

class Envelope:
    """One message's envelope.

    id          queue id, set when DATA starts
    sender      reverse path without brackets; "" for <>
    recipients  forward paths, in the order accepted
    helo        the name the client gave in HELO/EHLO
    client      the client address from the connection; None when local
    protocol    SMTP, ESMTP, ESMTPS, ESMTPA or ESMTPSA (RFC 3848); LOCAL
                for bounces
    params      MAIL parameters: SIZE (int), BODY, SMTPUTF8 (True), and
                DSN's RET ("FULL" or "HDRS") and ENVID (xtext, verbatim)
    tls         TLS facts ({"version", "cipher"}) or None
    auth        the authenticated user or None
    arrival     seconds since the epoch when DATA started
    dsn         {address: {"notify": [...], "orcpt": "type;xtext"}}: the
                DSN request of each recipient that made one (RFC 3461)
    expanded    [{"address", "notify", "orcpt"}]: aliases owed an "expanded"
                report (RFC 3461 section 5.2.7.3)

    A thawed envelope also knows its spool file (path, offset of the
    message, size) and its delivery state:
    status      {address: Recipient}, one record per recipient
    attempts, next_attempt, last_attempt, last_error
    reports     the reports sent about the message as a whole ("expanded")
    held        True while netsmtp-queue --hold keeps it from being sent

    Delivery itself is the runner's (netsmtp.runner.QueueRunner.deliver).
    """

    FIELDS = ("id", "sender", "recipients", "helo", "client", "protocol",
              "params", "tls", "auth", "arrival", "dsn", "expanded")

    def __init__(self, sender="", recipients=(), helo=None, client=None,
                 protocol="SMTP", params=None, tls=None, auth=None, id=None,
                 arrival=None, dsn=None, expanded=()):
        self.id = id
        self.sender = sender
        self.recipients = list(recipients)
        self.helo = helo
        self.client = client
        self.protocol = protocol
        self.params = dict(params or {})
        self.tls = tls
        self.auth = auth
        self.arrival = arrival
        self.dsn = dict(dsn or {})
        self.expanded = list(expanded)
        self.path = None
        self.offset = 0
        self.size = None
        self.status = {}
        self.attempts = 0
        self.next_attempt = None
        self.last_attempt = None
        self.last_error = None
        self.reports = set()
        self.held = False

    def freeze(self):
        """The envelope as one line of JSON bytes, newline included."""
        data = {"version": SCHEMA_VERSION}
        data.update((name, getattr(self, name)) for name in self.FIELDS)
        return _COMPACT.encode(data).encode() + b"\n"

    @classmethod
    def from_json(cls, line):
        """Build an envelope from its frozen JSON line; ValueError if unusable."""
        data = json.loads(line)
        if not isinstance(data, dict) or not isinstance(data.get("version"), int):
            raise ValueError("not a netsmtp envelope")
        if data["version"] > SCHEMA_VERSION:
            raise ValueError("envelope schema %r is newer than this netsmtp" % data["version"])
        if not isinstance(data.get("id"), str) or not isinstance(data.get("recipients"), list):
            raise ValueError("envelope lacks id or recipients")
        return cls(**{name: data[name] for name in cls.FIELDS if name in data})

    # -- the spool file ----------------------------------------------------

    @classmethod
    def thaw(cls, path):
        """The envelope of the spool entry at path (ID.msg), state included.

        netsmtp.spool.Incomplete if the entry was never committed (not mail);
        ValueError (with the reason) if it cannot be parsed or was damaged;
        OSError if it cannot be read.
        """
        with open(path, "rb") as f:
            start = check_entry(f)
            f.seek(start)
            line = f.readline(MAX_ENVELOPE_LINE)
            if not line.endswith(b"\n"):
                raise ValueError("no envelope line")
            size = os.fstat(f.fileno()).st_size - start - len(line)
        try:
            envelope = cls.from_json(line)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError("envelope is not JSON: %s" % exc) from None
        except (TypeError, AttributeError, OverflowError) as exc:
            raise ValueError("bad envelope field: %s" % exc) from None
        name = os.path.basename(path)
        if name != envelope.id + ".msg":
            raise ValueError("envelope id %r does not match the file name" % envelope.id)
        if not all(isinstance(r, str) for r in envelope.recipients) or \
                not isinstance(envelope.sender, str) or not isinstance(envelope.params, dict):
            raise ValueError("bad sender, recipients or parameters")
        if not (_time(envelope.arrival) and all(
                isinstance(v, (str, NoneType)) for v in (envelope.helo, envelope.client,
                                                         envelope.protocol, envelope.auth))
                and isinstance(envelope.tls, (dict, NoneType))):
            raise ValueError("bad arrival, helo, client, protocol, tls or auth")
        if not isinstance(envelope.dsn, dict) or not all(
                isinstance(r, dict) for r in envelope.dsn.values()) or not all(
                isinstance(e, dict) and isinstance(e.get("address"), str)
                for e in envelope.expanded):
            raise ValueError("bad DSN requests")
        envelope.path, envelope.offset, envelope.size = os.fspath(path), start + len(line), size
        envelope.load_state()
        return envelope

    @property
    def state_path(self):
        return self.path[:-len(".msg")] + ".state"

    def load_state(self):
        """Read the delivery state from ID.state (a fresh entry has none)."""
        self.status = {}
        for r in self.recipients:
            request = self.dsn.get(r, {})
            notify = request.get("notify")
            self.status[r] = Recipient(r, notify=None if notify is None else tuple(notify),
                                       orcpt=request.get("orcpt"))
        self.attempts, self.next_attempt, self.last_attempt, self.last_error = 0, None, None, None
        self.reports, self.held = set(), False
        try:
            with open(self.state_path, "rb") as f:
                data = json.loads(f.read(MAX_ENVELOPE_LINE))
        except FileNotFoundError:
            return
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError("state is not JSON: %s" % exc) from None
        try:
            for item in data["recipients"]:
                if item["address"] in self.status:
                    self.status[item["address"]].load(item)
            self.attempts = int(data["attempts"])
            self.next_attempt, self.last_attempt = data["next_attempt"], data["last_attempt"]
            self.last_error = data["last_error"]
            if not (_time(self.next_attempt) and _time(self.last_attempt)
                    and isinstance(self.last_error, (str, NoneType))):
                raise ValueError("attempt times")
            reports, self.held = data.get("reports", []), data.get("held", False)
            if not isinstance(reports, list) or not isinstance(self.held, bool):
                raise ValueError("reports or held")
            self.reports = set(reports)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise ValueError("bad state: %r" % exc) from None

    def freeze_state(self):
        """The delivery state as JSON bytes, for ID.state."""
        data = {"version": SCHEMA_VERSION, "id": self.id, "attempts": self.attempts,
                "next_attempt": self.next_attempt, "last_attempt": self.last_attempt,
                "last_error": self.last_error, "reports": sorted(self.reports), "held": self.held,
                "recipients": [self.status[r].to_json() for r in self.recipients]}
        return json.dumps(data, ensure_ascii=False).encode() + b"\n"

    def describe(self):
        """Everything known about the entry as a JSON-ready dict (netsmtp-queue --json)."""
        data = {name: getattr(self, name) for name in self.FIELDS}
        data.update(size=self.size, attempts=self.attempts, next_attempt=self.due_at,
                    last_attempt=self.last_attempt, last_error=self.last_error,
                    held=self.held, requiretls=bool(self.params.get("REQUIRETLS")),
                    tls_required=self.tls_required,
                    recipients=[dict(self.status[r].to_json(), notify=self.status[r].notify,
                                     orcpt=self.status[r].orcpt) for r in self.recipients])
        return data

    @property
    def tls_required(self):
        """"no" for a message that asks TLS-Required: No (RFC 8689 section 4.1), else None.

        Read from the spooled header section, which keeps the field; it
        counts only without REQUIRETLS, and two such fields count as none
        (section 3 allows one).  It changes nothing while the only relay is
        a configured smarthost: its TLS mode is the operator's policy, not
        one the recipient domain asserts.
        """
        if self.params.get("REQUIRETLS") or self.path is None:
            return None
        values = []
        with self.open() as message:
            header = b""
            for line in iter(lambda: message.readline(MAX_HEADER_LINE), b""):
                if line in (b"\r\n", b"\n") or len(header) > MAX_ENVELOPE_LINE:
                    break
                header += line
        for field in re.split(rb"\r?\n(?![ \t])", header):
            name, sep, value = field.partition(b":")
            if sep and name.strip().lower() == b"tls-required":
                values.append(b" ".join(value.split()).lower())
        return "no" if values == [b"no"] else None

    @property
    def due_at(self):
        """When the next attempt is due: at arrival for a new entry."""
        return self.next_attempt if self.next_attempt is not None else self.arrival or 0

    def add_recipients(self, address, replacement, request):
        """Add what one RCPT brings: address, or the addresses check_rcpt_to replaced it by.

        request is its DSN request ({} or "notify" and "orcpt").  One target
        inherits it; several (an alias) are handled as RFC 3461 section
        5.2.7.3 (c) says: a SUCCESS asked of the alias is answered at once
        with an "expanded" report, and each target gets the request without
        SUCCESS and an ORCPT naming the alias.  A repeated address is kept
        once, with its first request.
        """
        targets = [address] if replacement is None else list(replacement)
        if len(targets) > 1 and request:
            notify = request.get("notify")
            if notify is not None and "SUCCESS" in notify:
                self.expanded.append({"address": address, **request})
            request = dict(request, orcpt=request.get("orcpt") or dsn_params.orcpt_for(address))
            if notify is not None:
                request["notify"] = list(dsn_params.without_success(notify))
        for recipient in targets:
            if recipient not in self.recipients:
                self.recipients.append(recipient)
                if request:
                    self.dsn[recipient] = dict(request)

    def recipients_in(self, *statuses):
        """The addresses whose status is one of statuses, in order."""
        return [r for r in self.recipients if self.status[r].status in statuses]

    @property
    def finished(self):
        return all(self.status[r].final for r in self.recipients)

    def open(self):
        """The raw message as a binary file, positioned after the envelope."""
        f = open(self.path, "rb")
        f.seek(self.offset)
        return f

    # -- sending -------------------------------------------------------------

    def send(self, runner=None):
        """Try every pending recipient once and update the spool; returns an Outcome.

        runner is a netsmtp.runner.QueueRunner; by default one with default
        options for this entry's spool, closed afterwards.
        """
        if runner is not None:
            return runner.send(self)
        from .options import Options
        from .runner import QueueRunner
        with QueueRunner(Options(spool=os.path.dirname(self.path) or ".")) as runner:
            return runner.send(self)

    def __repr__(self):
        return "<Envelope %s from <%s> to %d recipient(s)>" % (
            self.id, self.sender, len(self.recipients))
