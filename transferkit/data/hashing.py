"""Content hashing of images: the key under which an image's codes are cached, whatever its file is called."""

from __future__ import annotations

import hashlib

DIGEST = 16  # bytes of blake2b per image


def content_hash(data: bytes | memoryview) -> bytes:
    """The 16-byte digest that keys an image's codes."""
    return hashlib.blake2b(data, digest_size=DIGEST).digest()
