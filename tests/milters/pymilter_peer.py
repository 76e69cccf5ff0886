"""A programmable milter on Sendmail's own libmilter (Debian's python3-milter, GPL).

Run by the tests under Debian's /usr/bin/python3, never imported by netsmtp:
    pymilter_peer.py inet:PORT@127.0.0.1 EVENTS_FILE
What it does is chosen by the message: the sender's local part picks the
end-of-message action, a recipient's local part a RCPT refusal.  Every event,
with the macros it saw, is appended to EVENTS_FILE as a JSON line.
"""

import json
import sys

import Milter

SOCKET, EVENTS = sys.argv[1], sys.argv[2]
MACROS = ("j", "_", "i", "{daemon_name}", "{client_addr}", "{client_name}", "{auth_type}",
          "{auth_authen}", "{tls_version}", "{cipher}", "{mail_addr}", "{rcpt_addr}")


def record(event, milter, **data):
    macros = {m: milter.getsymval(m) for m in MACROS}
    data.update(event=event, macros={m: v for m, v in macros.items() if v is not None})
    with open(EVENTS, "a") as f:
        f.write(json.dumps(data) + "\n")


class Peer(Milter.Base):
    def __init__(self):
        self.sender = ""
        self.headers = []
        self.text = b""

    def connect(self, hostname, family, hostaddr):
        record("connect", self, hostname=hostname, address=str(hostaddr[0]) if hostaddr else None)
        return Milter.CONTINUE

    def hello(self, name):
        record("helo", self, name=name)
        return Milter.CONTINUE

    def envfrom(self, sender, *args):
        self.sender, self.headers, self.text = sender.strip("<>"), [], b""
        record("mail", self, sender=sender, args=list(args))
        if self.sender.startswith("tempfail-mail@"):
            return Milter.TEMPFAIL
        if self.sender.startswith("discard-mail@"):
            return Milter.DISCARD
        return Milter.CONTINUE

    def envrcpt(self, recipient, *args):
        record("rcpt", self, recipient=recipient)
        if recipient.strip("<>").startswith("reject@"):
            return Milter.REJECT
        if recipient.strip("<>").startswith("code@"):
            self.setreply("553", "5.1.2", "no such domain here")
            return Milter.REJECT
        return Milter.CONTINUE

    def header(self, name, value):
        self.headers.append([name, value])
        return Milter.CONTINUE

    def eoh(self):
        record("eoh", self, headers=self.headers)
        return Milter.CONTINUE

    def body(self, chunk):
        self.text += chunk
        return Milter.CONTINUE

    def eom(self):
        record("eom", self, body=self.text.decode("utf-8", "replace"))
        action = self.sender.split("@")[0]
        if action == "replycode":
            self.setreply("554", "5.7.1", "go away")
            return Milter.REJECT
        if action == "reject":
            return Milter.REJECT
        if action == "tempfail":
            return Milter.TEMPFAIL
        if action == "discard":
            return Milter.DISCARD
        if action == "modify":
            self.addheader("X-Test", "1")
            self.addheader("X-First", "top", 0)
            self.chgheader("Subject", 1, "new subject")
            self.chgheader("X-Remove", 1, "")
            for piece in (b"new body line 1\n", b"new body line 2\r\n", b"last line\n"):
                self.replacebody(piece)
        if action == "envelope":
            self.addrcpt("<added@example.test>")
            self.delrcpt("<gone@example.test>")
            self.chgfrom("<changed@example.test>")
        if action == "quarantine":
            self.quarantine("virus found")
        if action == "badheader":
            self.addheader("X-Evil", "x\n\nbody")
        return Milter.ACCEPT

    def abort(self):
        record("abort", self)
        return Milter.CONTINUE

    def close(self):
        return Milter.CONTINUE


if __name__ == "__main__":
    Milter.factory = Peer
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.CHGBODY | Milter.ADDRCPT
                     | Milter.DELRCPT | Milter.CHGFROM | Milter.QUARANTINE)
    Milter.runmilter("netsmtp-test", SOCKET, 30)
