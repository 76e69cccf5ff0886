"""Deliveries: where a spooled message goes, one route at a time.

A Delivery takes a thawed envelope and some of its recipients and returns
one Result per recipient, an SMTP reply: 2xx delivered, 4xx try again
later, 5xx failed for good.  The route table (option `routes`) picks a
Delivery by recipient domain; netsmtp.smarthost.SmarthostDelivery forwards with
smtplib, netsmtp.maildir.MaildirDelivery writes to local mailboxes.

Plug in your own delivery by subclassing Delivery and naming it in the
queue runner's table of deliveries:

    class Archive(Delivery):
        def deliver(self, envelope, recipients):
            with envelope.open() as message:
                ...  # store message somewhere durable
            return {r: Result(250, "2.0.0 archived") for r in recipients}

    class Runner(QueueRunner):
        deliveries = {**QueueRunner.deliveries, "archive": Archive}

    raise SystemExit(netsmtp.queue_cli.send_main(runner_class=Runner))

with `routes = {"archive.example" = "archive", "*" = "smarthost"}` in the
config file.
"""

from .address import domain_of
from .envelope import Result

__all__ = ["Delivery", "Result", "Routes"]  # Result lives in envelope.py, with the records


class Delivery:
    """One way to deliver.  One instance serves a whole queue run.

    Methods that may be overridden:
        deliver(envelope, recipients)  -> {recipient: Result}; a recipient
                        left out is deferred.  Raise nothing for a per-message
                        problem: return 4xx or 5xx results instead.
        describe()      a few words for --dry-run ("smarthost mx:25")
        close()         called once at the end of the run

    Class variables that may be overridden:
        final           True when a 2xx is final delivery (a mailbox), so a
                        recipient asking NOTIFY=SUCCESS gets "delivered"
                        rather than "relayed"
        relays_dsn      True while the last deliver() passed the DSN request
                        on (to a server that reports itself); no report then
    """

    name = "delivery"
    final = False
    relays_dsn = False

    def __init__(self, options):
        self.options = options

    def deliver(self, envelope, recipients):
        raise NotImplementedError

    def describe(self):
        return self.name

    def close(self):
        pass


class Routes:
    """The route table: recipient domain -> delivery name, "*" for the rest.

    Without a configured table, the local domains go to "maildir" when a
    maildir_root is set, and everything else to "smarthost".
    """

    def __init__(self, options):
        table = dict(options.routes or {})
        if options.routes is None and options.maildir_root:
            table.update((domain, "maildir") for domain in options.local_domains)
        table.setdefault("*", "smarthost")
        self.table = table
        self.hostname = options.hostname.lower()

    def __call__(self, address):
        domain = domain_of(address) or self.hostname  # <postmaster> is ours
        return self.table.get(domain, self.table["*"])

    def names(self):
        return set(self.table.values())
