"""Integer seeds derived from text, stable across Python versions, processes and machines."""

import hashlib


def hash_int(text: str) -> int:
    """A 63-bit seed (fits torch.Generator.manual_seed) from a text key."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)
