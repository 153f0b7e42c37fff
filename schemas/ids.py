"""Identifier factories: time-ordered, so ids sort by creation and page well."""

from __future__ import annotations

import random
import time
import uuid


def new_id() -> str:
    """A UUIDv7 string (RFC 9562): 48 bits of milliseconds, then randomness."""
    ms = time.time_ns() // 1_000_000
    # Ids need uniqueness, not secrecy: the PRNG avoids a syscall per id (it is reseeded after fork).
    rand = random.getrandbits(80)
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | rand & ((1 << 80) - 1)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return str(uuid.UUID(int=value))
