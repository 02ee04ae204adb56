"""
The bits of HTTP's grammar (RFC 9110 5.6) both directions are judged by:
the agent's request heads and the upstream's response heads.
"""

from __future__ import annotations

import re
from typing import Final

# A token's characters (tchar), as the body of a regular-expression class.
TCHAR: Final = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
TOKEN: Final = re.compile(rb"[" + TCHAR + rb"]+")
# A Content-Length: decimal digits, at most 18 (it always fits a signed 64-bit integer).
CONTENT_LENGTH: Final = re.compile(rb"[0-9]{1,18}")
# A request target as forwarded: a path (and query) of visible ASCII, with no
# space, control or non-ASCII byte (RFC 9112's origin-form, narrowed).
REQUEST_TARGET: Final = re.compile(rb"/[\x21-\x7e]*")
