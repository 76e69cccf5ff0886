"""The recipient table: who exists at the local domains, and where aliases go.

A real MX refuses an unknown recipient at RCPT (550 5.1.1) rather than
accepting it and bouncing later to a sender that may be forged
(backscatter).  The table is a text file, one entry a line:

    # address                 [targets]
    ann@example.com
    sales@example.com         ann@example.com, bob@example.com
    @example.net              catchall@example.com

An address alone is a mailbox; with targets it is an alias, expanded at
RCPT into the envelope (recursively, at most MAX_ALIAS_DEPTH levels);
"@domain" catches what no exact entry matches.  Matching ignores case;
"#" starts a comment anywhere.  The whole file is checked when it is read
(syntax, local domains, loops, depth), so a table is never half loaded, and
it is read again whenever its file changes (see current()).  The last good
text is shared by every process through a file in SPOOL/locks, so a
process whose reload fails serves the last good table, not its own older
one (see LastGood).
"""

import hashlib
import logging
import os

from .address import AddressError, parse_path

log = logging.getLogger(__name__)

MAX_ALIAS_DEPTH = 8
MAX_TABLE_SIZE = 64 * 1024 * 1024  # octets; a bigger file is a mistake, not a table

MAILBOX, ALIAS, REFUSED = "mailbox", "alias", "refused"


class TableError(ValueError):
    """A recipient table that cannot be used; the message names the file and line."""


class Resolution:
    """What one recipient address comes to.

    kind        MAILBOX, ALIAS or REFUSED
    address     the address asked about
    targets     the addresses the envelope gets instead (for MAILBOX, the
                address itself, extension kept)
    entry       the table entry that matched ("ann@example.com",
                "@example.net"), or None
    reply       for REFUSED: the key of the reply table (550 5.1.1, 450 4.1.1)
    reason      for REFUSED: a few words for logs and --check-recipient
    """

    def __init__(self, kind, address, targets=(), entry=None, reply=None, reason=None):
        self.kind, self.address, self.targets = kind, address, tuple(targets)
        self.entry, self.reply, self.reason = entry, reply, reason

    @property
    def accepted(self):
        return self.kind != REFUSED

    def refused(self, reply, reason):
        """A copy of this resolution that refuses with reply."""
        return Resolution(REFUSED, self.address, (), self.entry, reply, reason)

    def __str__(self):
        """One line, as --check-recipient prints it."""
        if self.kind == REFUSED:
            return "%s: refused: %s %s" % (self.address, self.reply, self.reason)
        if self.kind == ALIAS:
            return "%s: alias %s -> %s" % (self.address, self.entry, ", ".join(self.targets))
        if self.entry:
            return "%s: mailbox (entry %s)" % (self.address, self.entry)
        if split_local(self.address)[0].lower() == "postmaster":
            return "%s: mailbox (postmaster always exists)" % self.address
        return "%s: mailbox" % self.address


def split_local(address):
    """(local part, lower-cased domain) of an address; domain "" for <postmaster>."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain.lower()


def base_of(local, delimiter):
    """The local part without its extension: "ann" for "ann+lists" with "+"."""
    if not delimiter:
        return None
    cut = min((i for i in (local.find(c) for c in delimiter) if i > 0), default=-1)
    return local[:cut] if cut > 0 else None


def strip_comment(line):
    return line.partition("#")[0]


def check_address(text):
    """text if it is an RFC 5321 address ("@domain" allowed), else AddressError."""
    probe = "x" + text if text.startswith("@") else text
    address, params = parse_path("<%s>" % probe)
    if params or not address or "@" not in address:
        raise AddressError("address")
    return text[:-1] if text.endswith(".") else text


def stamp_of(st):
    """(device, inode, size, mtime, ctime) of an os.stat result."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def newer(stamp, than):
    """True when stamp is a later version of the file than than (by change time)."""
    return than is None or (stamp[4], stamp[3]) > (than[4], than[3])


class RecipientTable:
    """A parsed recipient file for some local domains.

    entries     {lower-cased address or "@domain": tuple of targets, or
                None for a mailbox}
    mailboxes   lower-cased addresses the table names as mailboxes: the
                entries without targets and the local alias targets no entry
                matches (see is_own_mailbox)
    """

    def __init__(self, path, local_domains, delimiter="", hostname=None):
        self.path = os.fspath(path)
        self.local_domains = frozenset(d.lower() for d in local_domains)
        self.delimiter = delimiter or ""
        self.hostname = (hostname or "").lower()
        self.entries = {}
        self.mailboxes = frozenset()
        self.stamp = None
        self.failed_stamp = None  # the file change whose reload failed
        self.text = None  # the file's text, as parsed

    # -- reading -------------------------------------------------------------

    @classmethod
    def load(cls, path, local_domains, delimiter="", hostname=None):
        """A table read from path; TableError names the file and line of a problem."""
        table = cls(path, local_domains, delimiter, hostname)
        table.read()
        return table

    def file_stamp(self):
        """What tells a changed file: inode, size, modification and change times."""
        return stamp_of(os.stat(self.path))

    def read(self):
        """Parse the file into this table, or raise TableError and change nothing."""
        try:
            with open(self.path, "rb") as f:
                stamp = stamp_of(os.fstat(f.fileno()))  # the stamp of the file read
                data = f.read(MAX_TABLE_SIZE + 1)
        except OSError as exc:
            raise TableError("%s: cannot read: %s" % (self.path, exc.strerror or exc)) from None
        if len(data) > MAX_TABLE_SIZE:
            raise TableError("%s: over %d octets" % (self.path, MAX_TABLE_SIZE))
        self.use(data, stamp)

    def use(self, data, stamp):
        """Parse data (the file's bytes at stamp) into this table, or raise TableError."""
        entries, lines = self.parse(data)
        mailboxes = self.check(entries, lines)
        self.entries, self.mailboxes, self.stamp = entries, frozenset(mailboxes), stamp
        self.text = data.decode("utf-8")  # parse() decoded every line: this cannot fail

    def parse(self, data):
        """({key: targets or None}, {key: line number}) from the file's bytes."""
        entries, lines = {}, {}
        for number, raw in enumerate(data.split(b"\n"), 1):
            where = "%s:%d" % (self.path, number)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TableError("%s: not UTF-8" % where) from None
            words = strip_comment(line).replace(",", " ").split()
            if not words:
                continue
            try:
                address = check_address(words[0])
            except AddressError:
                raise TableError("%s: bad address %r" % (where, words[0][:100])) from None
            key = address.lower()
            domain = split_local(key)[1]
            if domain not in self.local_domains:
                raise TableError("%s: %s is not a local domain (local_domains)" % (
                    where, domain))
            if key in entries:
                raise TableError("%s: %s is listed twice (first on line %d)" % (
                    where, address, lines[key]))
            targets = []
            for word in words[1:]:
                try:
                    target = check_address(word)
                except AddressError:
                    raise TableError("%s: bad target address %r" % (where, word[:100])) from None
                if target.startswith("@"):
                    raise TableError("%s: a target must be an address, not %s" % (where, target))
                targets.append(target)
            entries[key] = tuple(targets) or None
            lines[key] = number
        return entries, lines

    def check(self, entries, lines):
        """Expand every alias once: loops and depth fail here, at load, never at RCPT.

        Returns the set of the mailboxes the table names.
        """
        mailboxes = {key for key, targets in entries.items()
                     if targets is None and not key.startswith("@")}
        for key, targets in entries.items():
            if targets is None:
                continue
            try:
                finals = self.expand_targets(entries, targets, (key,))
            except TableError as exc:
                raise TableError("%s:%d: %s: %s" % (self.path, lines[key], key, exc)) from None
            mailboxes.update(t.lower() for t in finals if self.is_own_mailbox(entries, t))
        return mailboxes

    def is_own_mailbox(self, entries, target):
        """True for a local alias target that no entry names (a catch-all aside).

        A target with an entry of its own, exact or by its base (ann+lists@
        with an entry ann@), is that entry's mailbox, already counted: so
        ann+lists@ lands in ann's Maildir whether it came by an alias or not.
        """
        if split_local(target)[1] not in self.local_domains:
            return False
        found = self.lookup(target, entries)
        return found is None or found[0].startswith("@")

    # -- lookups --------------------------------------------------------------

    def lookup(self, address, entries=None):
        """(entry key, targets or None) for an address, or None when nothing matches.

        The order: the whole address, then (with a delimiter) the address
        without its extension, then the domain's catch-all.  postmaster at
        a local domain (or <postmaster>) always exists (RFC 5321 section 4.5.1).
        """
        entries = self.entries if entries is None else entries
        local, domain = split_local(address)
        if not domain:  # <postmaster>: the entry of postmaster@hostname, if any
            key = "postmaster@" + self.hostname
            return (key, entries[key]) if key in entries else ("postmaster", None)
        key = "%s@%s" % (local.lower(), domain)
        if key in entries:
            return key, entries[key]
        base = base_of(local, self.delimiter)
        if base is not None:
            key = "%s@%s" % (base.lower(), domain)
            if key in entries:
                return key, entries[key]
        if local.lower() == "postmaster":
            return "postmaster@" + domain, None
        key = "@" + domain
        if key in entries:
            return key, entries[key]
        return None

    def expand_targets(self, entries, targets, path):
        """The final addresses of an alias's targets, duplicates removed.

        A target at a local domain goes through the table again (a target
        with no entry is a mailbox the table names); any other is forwarded
        as is, by its route.  Targets are used as written: no extension of
        the address asked about is carried over.
        """
        finals, seen = [], set()
        for target in targets:
            for final in self.expand(entries, target, path):
                if final.lower() not in seen:
                    seen.add(final.lower())
                    finals.append(final)
        return finals

    def expand(self, entries, address, path):
        if split_local(address)[1] not in self.local_domains:
            return [address]
        found = self.lookup(address, entries)
        if found is None or found[1] is None:
            return [address]
        key, targets = found
        if key in path:
            raise TableError("alias loop: %s" % " -> ".join((*path, key)))
        if len(path) >= MAX_ALIAS_DEPTH:
            raise TableError("aliases nested deeper than %d: %s" % (
                MAX_ALIAS_DEPTH, " -> ".join((*path, key))))
        return self.expand_targets(entries, targets, (*path, key))

    def resolve(self, address):
        """The Resolution of a recipient at a local domain."""
        found = self.lookup(address)
        if found is None:
            return Resolution(REFUSED, address, reply="550 5.1.1",
                              reason="no entry in %s" % self.path)
        key, targets = found
        if targets is None:
            return Resolution(MAILBOX, address, (address,), key if key in self.entries else None)
        return Resolution(ALIAS, address, self.expand_targets(self.entries, targets, (key,)), key)

    def names_mailbox(self, address):
        """True when the table itself names address (or its base) as a mailbox."""
        local, domain = split_local(address.lower())
        if not domain or local == "postmaster":
            return True
        if address.lower() in self.mailboxes:
            return True
        base = base_of(local, self.delimiter)
        return base is not None and "%s@%s" % (base, domain) in self.mailboxes

    def lacks_postmaster(self):
        """The local domains whose postmaster has no entry of its own."""
        return sorted(d for d in self.local_domains if "postmaster@" + d not in self.entries)


class LastGood:
    """The last good text of a table's file, shared by every process: SPOOL/locks/recipients-*.json.

    A prefork worker forked before a good change and idle over it still
    holds the table from before; if the file is broken by its first
    session, its own table is not the last good one.  So whichever process
    loads a changed file records the text with its stamp here, and a process
    whose reload fails adopts the recorded text when it is a later version
    than its own table.  Written only when a changed file loads (and the
    copy there is an older version); read only when a reload fails, so an
    unchanged file still costs one stat a session.
    """

    def __init__(self, options, key):
        from .limits import SharedState
        self.key = repr(key)  # the file and the options it is read with
        name = hashlib.sha256(self.key.encode("utf-8")).hexdigest()[:32]
        self.state = SharedState(os.path.join(options.spool, "locks", "recipients-%s.json" % name),
                                 valid=self.valid)

    def valid(self, doc):
        return (isinstance(doc, dict) and (not doc or doc.get("key") == self.key
                and isinstance(doc.get("text"), str) and isinstance(doc.get("stamp"), list)
                and len(doc["stamp"]) == 5 and all(isinstance(n, int) for n in doc["stamp"])))

    def record(self, table):
        """Share table's text, unless a later (or the same) version is recorded already."""
        def change(doc):
            if doc and not newer(table.stamp, tuple(doc["stamp"])):
                return
            doc.clear()
            doc.update(key=self.key, stamp=list(table.stamp), text=table.text)
        try:
            doc = self.state.load()
            if not doc or newer(table.stamp, tuple(doc["stamp"])):
                self.state.update(change)
        except OSError as exc:
            log.warning("%s: cannot share the table: %s", self.state.path, exc)

    def adopt(self, table):
        """A table of the recorded text when it is later than table's, else None."""
        try:
            doc = self.state.load()
        except OSError as exc:
            log.warning("%s: cannot read the shared table: %s", self.state.path, exc)
            return None
        if not doc or not newer(tuple(doc["stamp"]), table.stamp):
            return None
        fresh = RecipientTable(table.path, table.local_domains, table.delimiter, table.hostname)
        try:
            fresh.use(doc["text"].encode("utf-8"), tuple(doc["stamp"]))
        except (TableError, UnicodeError) as exc:
            log.warning("%s: the shared table does not load: %s", self.state.path, exc)
            return None
        log.info("%s: the last good table another process loaded is in force, %d entries",
                 table.path, len(fresh.entries))
        return fresh


# One table per process and file, shared by the sessions a process serves
# (a prefork worker serves many); each session asks current() once.
_TABLES = {}


def current(options):
    """The recipient table of options (None without one), reread when its file changed.

    A stat per call is the whole cost of an unchanged file.  A file that
    changed but no longer parses (or cannot be read) keeps the last good
    table in force, with an error logged once per change: this process's
    own, or the later one another process loaded (LastGood); TableError
    only when there never was a good table.
    """
    if not options.recipients:
        return None
    key = (options.recipients, tuple(options.local_domains),
           options.recipient_delimiter or "", options.hostname.lower())
    table = _TABLES.get(key)
    if table is None:
        table = RecipientTable.load(options.recipients, options.local_domains,
                                    options.recipient_delimiter, options.hostname)
        _TABLES[key] = table
        return table
    try:
        stamp = table.file_stamp()
    except OSError as exc:
        stamp = ("unreadable", exc.errno)
    if stamp != table.stamp and stamp != table.failed_stamp:
        try:
            fresh = RecipientTable.load(options.recipients, options.local_domains,
                                        options.recipient_delimiter, options.hostname)
        except TableError as exc:
            log.error("%s; the table read before stays in force", exc)
            _TABLES[key] = table = LastGood(options, key).adopt(table) or table
            table.failed_stamp = stamp
        else:
            _TABLES[key] = table = fresh
            log.info("%s: reloaded, %d entries", options.recipients, len(table.entries))
            LastGood(options, key).record(table)
    return table


def refresh(options):
    """In a server's parent, just before it forks: reread the table if it changed.

    A child starts from the parent's copy.  Without this every child would
    start from the table the daemon began with, and after a good reload and
    then a broken file, it would keep that start table in force instead of
    the last good one (and reread an unchanged file once per fork).
    """
    if options.recipients:
        try:
            current(options)
        except TableError:
            pass  # never loaded: the child fails its sessions itself (451 4.3.0)


def resolve(options, address, table=None, verify=None):
    """What a recipient at a local domain comes to: the default RCPT steps.

    1. The table (when there is one): a mailbox, an alias's targets, or
       550 5.1.1 for an address no entry matches.
    2. Each local target routed to maildir must have a mailbox
       (netsmtp.maildir.mailbox_of), or 550 5.1.1.
    3. With verify (netsmtp.verify.Verifier.verify), each local target
       routed to the smarthost is asked about there: 550 5.1.1 for a 5xx,
       450 4.1.1 when there was no definite answer.
    postmaster is always accepted (RFC 5321 section 4.5.1); remote alias
    targets are forwarded by their route, unchecked.
    """
    if table is not None:
        resolution = table.resolve(address)
    else:
        resolution = Resolution(MAILBOX, address, (address,))
    if not resolution.accepted or split_local(address)[0].lower() == "postmaster":
        return resolution
    if options.maildir_root is None and verify is None:
        return resolution  # nothing more to ask (and nothing more to import)
    from .delivery import Routes
    from .maildir import mailbox_of
    route = Routes(options)
    local_domains = set(options.local_domains)
    for target in resolution.targets:
        local, domain = split_local(target)
        if domain and domain not in local_domains or local.lower() == "postmaster":
            continue
        how = route(target)
        if how == "maildir" and options.maildir_root is not None:
            if mailbox_of(options, target, table) is None:
                return resolution.refused("550 5.1.1", "no Maildir for <%s> under %s" % (
                    target, options.maildir_root))
        elif how == "smarthost" and verify is not None:
            reply, text = verify(target)
            if reply != "250":
                return resolution.refused(reply, "the smarthost said of <%s>: %s" % (
                    target, text))
    return resolution
