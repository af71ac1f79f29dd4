"""Plain-Python twins written from the published definitions, independent of bnnc's code, that
several tests compare bnnc against."""

from __future__ import annotations


def lowbias32(x: int) -> int:
    """Chris Wellons' lowbias32 integer hash (bnnc's numerics.hash32 and the C's bnnc_hash32)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x
