"""Bytes on the wire: command lines and the DATA stream, both bounded.

Only CRLF ends a line of message text and only CRLF.CRLF ends a message
(RFC 5321 sections 2.3.8 and 4.1.1.4).  A message that holds a bare CR or a
bare LF is read to its real end and then refused: a bare LF never ends a line
or the message, which closes the SMTP smuggling attack (CVE-2023-51766 and
kin) without guessing what the client meant.  Commands may end in CRLF or LF.
"""

READ_SIZE = 65536
TEXT_LINE_LIMIT = 1000  # RFC 5321 section 4.5.3.1.6, including CRLF
HEADER_LIMIT = 256 * 1024  # header section kept for check_message


class LineTooLong(Exception):
    """A command line went over its limit; it was read and thrown away."""


class DataProblem:
    """Why a message read to its end must still be refused."""

    TOO_BIG = "too big"
    BARE_NEWLINE = "bare CR or LF in message (RFC 5321 section 2.3.8)"
    NUL = "NUL byte in message (RFC 5322 section 2.3)"
    LINE_TOO_LONG = "line over %d octets (RFC 5321 section 4.5.3.1.6)" % TEXT_LINE_LIMIT


class LineReader:
    """A buffered reader whose buffer the session can see into.

    read1() is called only when a whole line or message end is not buffered
    yet, and wait() runs first: that is where the session flushes its
    replies, so pipelined commands (RFC 2920) get one write, not one each.
    EOF raises EOFError; a read error other than a timeout, ConnectionError.
    """

    def __init__(self, rfile, wait=lambda: None):
        self.rfile = rfile
        self.wait = wait
        self.buf = bytearray()

    def fill(self):
        self.wait()
        try:
            chunk = self.rfile.read1(READ_SIZE)
        except (TimeoutError, ConnectionError):
            raise
        except OSError as exc:
            # ssl.SSLError and kin: the stream is broken, like a reset.
            raise ConnectionError(exc) from exc
        if not chunk:
            raise EOFError("connection closed by client")
        self.buf += chunk

    def discard(self):
        """Forget buffered input, as after STARTTLS (RFC 3207 section 4.2)."""
        self.buf.clear()

    def readline(self, limit):
        """One line with its line ending; raise LineTooLong past limit octets."""
        buf, start, too_long = self.buf, 0, False
        while True:
            end = buf.find(b"\n", start)
            if end >= 0:
                line = bytes(buf[:end + 1])
                del buf[:end + 1]
                if too_long or len(line) > limit:
                    raise LineTooLong
                return line
            if len(buf) > limit:
                too_long = True
                del buf[:]
            start = len(buf)
            self.fill()

    def read_data(self, write, max_size):
        """Read message text up to CRLF.CRLF, unstuffing dots (section 4.5.2).

        write(chunk) gets the message in pieces while it is acceptable.
        Returns (size, problem): the message size in octets and None, or a
        DataProblem reason, in which case the rest was read and dropped.
        """
        buf, size, problem, at_line_start = self.buf, 0, None, True
        while True:
            if at_line_start and buf[:3] == b".\r\n":
                end = 0
            else:
                end = buf.find(b"\r\n.\r\n")
                end = end + 2 if end >= 0 else -1
            if end >= 0:
                cut = end
            else:
                last = buf.rfind(b"\r\n")
                cut = last + 2 if last >= 0 else 0
            if cut > 0:
                chunk = bytes(buf[:cut])
                del buf[:cut]
                if problem is None:
                    problem = _check(chunk)
                if problem is None:
                    if at_line_start and chunk[:1] == b".":
                        chunk = chunk[1:]
                    if b"\r\n." in chunk:
                        chunk = chunk.replace(b"\r\n.", b"\r\n")
                    size += len(chunk)
                    if size > max_size:
                        problem = DataProblem.TOO_BIG
                    else:
                        write(chunk)
                at_line_start = True
            elif len(buf) > TEXT_LINE_LIMIT:
                # No CRLF in a full line's worth: keep one octet, which may
                # be the CR of the CRLF that starts the terminator.
                problem = problem or DataProblem.LINE_TOO_LONG
                del buf[:-1]
                at_line_start = False
            if end >= 0:
                del buf[:3]
                return size, problem
            self.fill()


def _check(chunk):
    """The problem with a run of whole CRLF lines, or None."""
    crlf = chunk.count(b"\r\n")
    if chunk.count(b"\n") != crlf or chunk.count(b"\r") != crlf:
        return DataProblem.BARE_NEWLINE
    if b"\0" in chunk:
        return DataProblem.NUL
    if len(chunk) > TEXT_LINE_LIMIT and max(map(len, chunk.split(b"\r\n"))) > TEXT_LINE_LIMIT - 2:
        return DataProblem.LINE_TOO_LONG
    return None


class HeaderSection:
    """Collects the header section of a message as it streams past, bounded.

    feed() takes the message chunks; headers() returns [(name, value)] with
    folded lines joined, for check_message.  Past HEADER_LIMIT octets the
    rest is ignored and overflow is set.
    """

    def __init__(self):
        self.data = bytearray()
        self.done = False
        self.overflow = False

    def feed(self, chunk):
        if self.done:
            return
        if not self.data and chunk[:2] == b"\r\n":
            self.done = True
            return
        start = max(0, len(self.data) - 3)
        self.data += chunk
        end = self.data.find(b"\r\n\r\n", start)
        if end >= 0:
            del self.data[end + 2:]
            self.done = True
        elif len(self.data) > HEADER_LIMIT:
            del self.data[HEADER_LIMIT:]
            self.done = self.overflow = True

    def headers(self):
        fields = []
        for line in bytes(self.data).split(b"\r\n"):
            if line[:1] in (b" ", b"\t") and fields:
                name, value = fields[-1]
                fields[-1] = (name, value + "\r\n" + line.decode("utf-8", "replace"))
            elif line:
                name, sep, value = line.partition(b":")
                fields.append((name.decode("utf-8", "replace") if sep else None,
                               value.decode("utf-8", "replace").strip()))
        return fields
