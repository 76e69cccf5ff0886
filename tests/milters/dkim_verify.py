"""Verify a DKIM signature offline with Debian's dkimpy (python3-dkim), under /usr/bin/python3.

    dkim_verify.py MESSAGE_FILE TXT_FILE
TXT_FILE is opendkim-genkey's selector.txt; it answers the one DNS query.
Exit 0 when the signature verifies, 1 when it does not.
"""

import re
import sys

import dkim

message = open(sys.argv[1], "rb").read()
record = "".join(re.findall(r'"([^"]*)"', open(sys.argv[2]).read())).encode()
sys.exit(0 if dkim.verify(message, dnsfunc=lambda name, timeout=5: record) else 1)
