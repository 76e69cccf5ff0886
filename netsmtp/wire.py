"""Bytes on the wire: command lines, the DATA stream and BDAT chunks, all bounded.

Only CRLF ends a line of message text and only CRLF.CRLF ends a message
(RFC 5321 sections 2.3.8 and 4.1.1.4).  A message that holds a bare CR or a
bare LF is read to its real end and then refused: a bare LF never ends a line
or the message, which closes the SMTP smuggling attack (CVE-2023-51766 and
kin) without guessing what the client meant.  Commands may end in CRLF or LF.

BDAT chunks (RFC 3030) are counted octets with no end marker, so nothing in
them can end a message early; there a bare LF is stored as CRLF (see
ChunkedText).
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
    BARE_CR = "bare CR in message (RFC 5321 section 2.3.8)"
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

    def fill(self, wait=True):
        """Read what the client sent into buf; wait=False skips the wait() hook."""
        if wait:
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

    def read_exact(self, size, write):
        """Read exactly size octets (a BDAT chunk), handing them to write in pieces.

        At most one read's worth is buffered at a time, whatever size says.
        """
        buf = self.buf
        while size > 0:
            if not buf:
                self.fill()
            piece = bytes(buf[:size])
            del buf[:len(piece)]
            size -= len(piece)
            write(piece)

    def read_data(self, write, max_size, line_done=lambda: None):
        """Read message text up to CRLF.CRLF, unstuffing dots (section 4.5.2).

        write(chunk) gets the message in pieces while it is acceptable;
        line_done() is called whenever whole lines have arrived, refused or not.
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
                line_done()
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


class ChunkedText:
    """The text of BDAT chunks on its way to write(), checked as DATA text is.

    Exchange Online sends messages with bare LFs only over BDAT, so a bare LF
    is stored as CRLF: the spool keeps CRLF lines only, and relaying with DATA
    stays safe.  A bare CR or a NUL, and a line over TEXT_LINE_LIMIT, make
    the message refused when it ends; from the first problem on, the rest is
    read and dropped.  A CR that ends one chunk is held back: an LF starting
    the next makes it a CRLF.  size counts every octet received, for the
    --max-size check over all chunks.
    """

    def __init__(self, write, max_size):
        self.write = write
        self.max_size = max_size
        self.size = 0
        self.problem = None
        self.held_cr = False
        self.line = 0  # octets of the unfinished line written so far

    def feed(self, data):
        self.size += len(data)
        if self.size > self.max_size:
            self.problem = DataProblem.TOO_BIG
        if self.problem is not None or not data:
            return
        if self.held_cr:
            data = b"\r" + data
        self.held_cr = data.endswith(b"\r")
        if self.held_cr:
            data = data[:-1]
        crlf = data.count(b"\r\n")
        if data.count(b"\r") != crlf:
            self.problem = DataProblem.BARE_CR
        elif b"\0" in data:
            self.problem = DataProblem.NUL
        else:
            if data.count(b"\n") != crlf:
                data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            lines = data.split(b"\r\n")
            longest = max(self.line + len(lines[0]), *map(len, lines[1:])) \
                if len(lines) > 1 else self.line + len(lines[0])
            self.line = len(lines[-1]) if len(lines) > 1 else self.line + len(lines[0])
            if longest > TEXT_LINE_LIMIT - 2:
                self.problem = DataProblem.LINE_TOO_LONG
            else:
                self.write(data)

    def end(self):
        """After the LAST chunk: the problem, or None once the text ends in CRLF."""
        if self.size > self.max_size:
            return DataProblem.TOO_BIG
        if self.problem is None and self.held_cr:
            self.problem = DataProblem.BARE_CR
        if self.problem is None and self.line:
            self.write(b"\r\n")  # RFC 3030 section 2: a last chunk need not end in CRLF
        return self.problem


class MessageSink:
    """Where a message's text goes as it arrives: the spool writer and the header section.

    A write error stops the writing but not the reading, so the client is
    still answered in step (452 at the end) and never mid-stream.
    """

    def __init__(self, writer):
        self.writer = writer
        self.header = HeaderSection()
        self.error = None

    def write(self, chunk):
        if self.error is None:
            self.header.feed(chunk)
            try:
                self.writer.write(chunk)
            except OSError as exc:
                self.error = exc


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
        """[(name, value)]; each field's lines are joined once, so the cost is linear."""
        fields = []  # [name, [value lines]]
        for line in bytes(self.data).split(b"\r\n"):
            if line[:1] in (b" ", b"\t") and fields:
                fields[-1][1].append(line.decode("utf-8", "replace"))
            elif line:
                name, sep, value = line.partition(b":")
                fields.append((name.decode("utf-8", "replace") if sep else None,
                               [value.decode("utf-8", "replace").strip()]))
        return [(name, "\r\n".join(lines)) for name, lines in fields]
