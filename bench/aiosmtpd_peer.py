"""aiosmtpd as a durable peer: each message written to a file and fsync'd before 250.

usage: aiosmtpd_peer.py HOST PORT DIRECTORY MAX_SIZE
"""

import asyncio
import os
import sys
import uuid

from aiosmtpd.smtp import SMTP


class FsyncHandler:
    """Write envelope and content to DIRECTORY/ID.msg, fsync file and directory."""

    def __init__(self, directory):
        self.directory = directory

    async def handle_DATA(self, server, session, envelope):
        path = os.path.join(self.directory, uuid.uuid4().hex + ".msg")
        with open(path, "wb") as f:
            f.write(("%s %s\r\n" % (envelope.mail_from, ",".join(envelope.rcpt_tos))).encode())
            f.write(envelope.original_content)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return "250 2.0.0 OK"


def main(host, port, directory, max_size):
    handler = FsyncHandler(directory)
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(
        lambda: SMTP(handler, data_size_limit=int(max_size), hostname="mx.bench.test"),
        host, int(port), backlog=512))
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    main(*sys.argv[1:])
