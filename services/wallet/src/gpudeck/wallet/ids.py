"""Time-ordered UUIDs (version 7 layout) so new rows land at the end of their indexes.

Within a process they are also strictly increasing (RFC 9562, method 3: the 74 bits after the
millisecond are a counter that starts at a random value each millisecond and counts up), so
transactions written in one batch, in the same millisecond, list in the order they were
booked.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

_SEQ_BITS = 74  # rand_a (12 bits) and rand_b (62 bits) together
_lock = threading.Lock()
_last_ms = 0
_last_seq = 0


def uuid7() -> uuid.UUID:
    global _last_ms, _last_seq
    ms = time.time_ns() // 1_000_000
    with _lock:
        if ms > _last_ms:
            # Start low in the range so counting up within the millisecond cannot overflow.
            seq = int.from_bytes(os.urandom(9), "big") >> 1  # 71 random bits
        else:  # the same millisecond (or the clock stepped back): count on from the last
            ms, seq = _last_ms, _last_seq + 1
            if seq >> _SEQ_BITS:
                ms, seq = ms + 1, 0
        _last_ms, _last_seq = ms, seq
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= (seq >> 62) << 64
    value |= 0b10 << 62
    value |= seq & ((1 << 62) - 1)
    return uuid.UUID(int=value)
