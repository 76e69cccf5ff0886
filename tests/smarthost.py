"""A small capturing SMTP server for the queue tests: a real peer on port 0.

Replies are scriptable per recipient (`rcpt_replies`), for MAIL and DATA;
it can offer PIPELINING (RFC 2920: replies in order suffice), and it can
offer STARTTLS with a trustme certificate and AUTH PLAIN.  Every message
that gets a 250 after DATA is kept in `messages`.
"""

import base64
import socketserver
import threading


class Captured:
    def __init__(self, sender, mail_args, recipients, data, tls, auth):
        self.sender, self.mail_args, self.recipients = sender, mail_args, recipients
        self.data, self.tls, self.auth = data, tls, auth


class Handler(socketserver.StreamRequestHandler):
    timeout = 10

    def reply(self, line):
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self):
        server = self.server
        tls = auth = False
        sender, recipients = None, []
        self.reply("220 capture.test ESMTP")
        while True:
            line = self.rfile.readline(2000)
            if not line:
                return
            command = line.decode("utf-8").rstrip("\r\n")
            verb, _, arg = command.partition(" ")
            verb = verb.upper()
            server.commands.append(command)
            if verb in ("EHLO", "HELO"):
                server.connections += verb == "EHLO" and not tls
                extensions = ["SIZE 100000000", "8BITMIME", "SMTPUTF8"]
                if server.pipelining:
                    extensions.append("PIPELINING")
                if server.tls_context and not tls:
                    extensions.append("STARTTLS")
                if server.auth:
                    extensions.append("AUTH PLAIN")
                if server.requiretls and tls:
                    extensions.append("REQUIRETLS")
                lines = ["capture.test"] + extensions
                for item in lines[:-1]:
                    self.reply("250-" + item)
                self.reply("250 " + lines[-1])
            elif verb == "STARTTLS" and server.tls_context:
                self.reply("220 2.0.0 go ahead")
                self.connection = server.tls_context.wrap_socket(self.connection, server_side=True)
                self.rfile = self.connection.makefile("rb")
                self.wfile = self.connection.makefile("wb")
                tls = True
            elif verb == "AUTH":
                _, _, initial = arg.partition(" ")
                _, user, password = base64.b64decode(initial).decode().split("\0")
                if (user, password) == server.auth:
                    auth = user
                    self.reply("235 2.7.0 ok")
                else:
                    self.reply("535 5.7.8 bad credentials")
            elif verb == "MAIL":
                sender = arg[5:].partition(">")[0].lstrip("<")
                mail_args = arg.partition(">")[2].split()
                recipients = []
                if not server.mail_reply.startswith("2"):
                    sender = None
                self.reply(server.mail_reply)
            elif verb == "RCPT":
                address = arg[3:].strip("<>")
                reply = server.rcpt_replies.get(address, "250 2.1.5 ok")
                if sender is None:
                    reply = "503 5.5.1 MAIL first"
                if reply.startswith("2"):
                    recipients.append(address)
                self.reply(reply)
            elif verb == "DATA" and not recipients:
                self.reply("554 5.5.1 no valid recipients")
            elif verb == "DATA":
                self.reply("354 go")
                data = bytearray()
                while True:
                    line = self.rfile.readline()
                    if line in (b".\r\n", b""):
                        break
                    data += line[1:] if line.startswith(b".") else line
                reply = server.data_reply
                if reply.startswith("250"):
                    server.messages.append(Captured(sender, mail_args, recipients,
                                                    bytes(data), tls, auth))
                self.reply(reply)
                if server.hang_up_after_data:
                    return
            elif verb == "RSET":
                sender, recipients = None, []
                self.reply("250 2.0.0 ok")
            elif verb == "QUIT":
                self.reply("221 2.0.0 bye")
                return
            else:
                self.reply("502 5.5.1 not here")


class CaptureServer(socketserver.ThreadingTCPServer):
    """Start with `with CaptureServer() as s:`; s.port, s.messages, s.commands."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, tls_context=None, auth=None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.tls_context, self.auth = tls_context, auth
        self.rcpt_replies = {}
        self.pipelining = False
        self.requiretls = False  # offer REQUIRETLS (RFC 8689) after STARTTLS
        self.hang_up_after_data = False
        self.mail_reply = "250 2.1.0 ok"
        self.data_reply = "250 2.0.0 queued"
        self.messages, self.commands = [], []
        self.connections = 0
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.shutdown()
        self.server_close()

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    def delivered_to(self):
        return sorted(r for m in self.messages for r in m.recipients)


def put(spool, sender="a@b.test", recipients=("u@x.test",), body=b"Subject: hi\r\n\r\nhello\r\n",
        arrival=None, params=None):
    """Spool a message directly, as the session would; returns its queue id."""
    import time

    from netsmtp.envelope import Envelope
    from netsmtp.spool import new_queue_id
    envelope = Envelope(sender=sender, recipients=recipients, helo="c.test", client="192.0.2.1",
                        protocol="ESMTP", params=params, id=new_queue_id(),
                        arrival=time.time() if arrival is None else arrival)
    spool.add(envelope, b"Received: from c.test\r\n" + body)
    return envelope.id


def run_cli(main, argv):
    """Run a netsmtp front end in-process, leaving the logging set-up as it was."""
    import logging
    logger = logging.getLogger("netsmtp")
    saved = logger.handlers[:], logger.propagate, logger.level
    try:
        return main([str(arg) for arg in argv])
    finally:
        logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]
