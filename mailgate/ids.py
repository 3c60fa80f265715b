"""Message ids: short, unique, time-ordered, safe in headers, file names and URLs.

A queue id names one accepted message everywhere: the Received header, the
logs, the webhook's idempotency key and (later) the spool file name.  12
base32 characters of milliseconds since the epoch followed by 10 of random
data keep them sortable and collision-free without coordination (like ULIDs).
"""

from __future__ import annotations

import base64
import os
import time


def new_queue_id(now: float | None = None) -> str:
    millis = int((time.time() if now is None else now) * 1000)
    stamp = base64.b32encode(millis.to_bytes(8, "big")).decode("ascii").rstrip("=")[-12:]
    random_part = base64.b32encode(os.urandom(10)).decode("ascii")[:10]
    return (stamp + random_part).upper()
