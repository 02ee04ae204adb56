"""
Encryption of what a shared store holds (the Redis store): AES-256-GCM
under a key from a private file, so a Redis operator, a replica or a stolen
dump reads no token and no key.

Every value is sealed with what it is the value of (the entry's kind and
names) as associated data: a value copied or renamed to another entry does
not decrypt, so whoever can write to Redis cannot hand one provider's token
to another, or a key to another name, without the store noticing.

A sealed value is C{FORMAT | key id (8 bytes) | nonce (12 bytes) |
ciphertext and tag}. The key id (a digest of the key, which tells nothing
about it) says which key sealed it, so that old keys can stay readable while
a new one is rolled out across a fleet (L{ValueCipher.old_keys}).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from credproxy._secret import read_capability_token_file
from credproxy.stores._interfaces import StoreCorrupt

FORMAT = b"\x01"
KEY_BYTES = 32  # AES-256
KEY_HEX_CHARS = 2 * KEY_BYTES  # what `credproxy new-token` writes
KEY_ID_BYTES = 8
NONCE_BYTES = 12  # GCM's own size; random per value
HEADER_BYTES = len(FORMAT) + KEY_ID_BYTES + NONCE_BYTES
TAG_BYTES = 16


class StoreKeyError(ValueError):
    """
    A store key file cannot be used; the message is one line naming the
    file and what to do, never any of its content.
    """


def read_store_key_file(path: str) -> bytes:
    """
    The 256-bit key in C{path}: 64 hex digits, as C{credproxy new-token}
    writes, in a regular file that neither group nor others may read.

    @raise StoreKeyError: the file is missing, unreadable, shared or not a key.
    """
    try:
        text = read_capability_token_file(
            path, what="store key file", min_bytes=KEY_HEX_CHARS
        ).reveal()
    except ValueError as e:
        raise StoreKeyError(str(e)) from None
    except OSError as e:
        raise StoreKeyError(f"cannot read store key file {path!r}: {e.strerror}") from None
    if len(text) != KEY_HEX_CHARS or not all(c in "0123456789abcdefABCDEF" for c in text):
        raise StoreKeyError(
            f"store key file {path!r} does not hold {KEY_HEX_CHARS} hex digits;"
            f" make one with: credproxy new-token {path}"
        )
    return bytes.fromhex(text)


def key_id(key: bytes) -> bytes:
    """
    The id a sealed value names its key by: a digest, never the key.
    """
    return hashlib.sha256(b"credproxy store key id\x00" + key).digest()[:KEY_ID_BYTES]


def associated_data(kind: str, *names: str) -> bytes:
    """
    What a value is the value of, unambiguously (JSON, so no name can pose
    as two).
    """
    return json.dumps(["credproxy", kind, *names], ensure_ascii=True).encode("ascii")


class ValueCipher:
    """
    Seals values under the current key and opens values sealed under it or
    under one of C{old_keys}. It never shows a key in its C{repr}.
    """

    def __init__(self, key: bytes, old_keys: Sequence[bytes] = ()) -> None:
        for candidate in (key, *old_keys):
            if len(candidate) != KEY_BYTES:
                raise ValueError(f"a store key has {KEY_BYTES} bytes")
        self.key_id = key_id(key)
        self._current = AESGCM(key)
        self._by_id = {key_id(k): AESGCM(k) for k in old_keys}
        self._by_id[self.key_id] = self._current

    def __repr__(self) -> str:
        return f"<ValueCipher key id {self.key_id.hex()} readable={len(self._by_id)}>"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return FORMAT + self.key_id + nonce + self._current.encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes, where: str) -> tuple[bytes, bool]:
        """
        The plaintext, and whether it was sealed under an old key (so the
        caller may seal it again under the current one).

        @param where: how messages name the entry (no value).
        @raise StoreCorrupt: it is not a sealed value, was sealed under a key
            this host lacks, was altered, or belongs to another entry.
        """
        if len(sealed) < HEADER_BYTES + TAG_BYTES or not sealed.startswith(FORMAT):
            raise StoreCorrupt(f"{where} is not a value credproxy sealed; not changed")
        kid = sealed[len(FORMAT) : len(FORMAT) + KEY_ID_BYTES]
        cipher = self._by_id.get(kid)
        if cipher is None:
            raise StoreCorrupt(
                f"{where} was sealed under store key {kid.hex()}, which this host does not"
                f" have (its key is {self.key_id.hex()}); give the old key with"
                " --store-old-key-file"
            )
        nonce = sealed[len(FORMAT) + KEY_ID_BYTES : HEADER_BYTES]
        try:
            plaintext = cipher.decrypt(nonce, sealed[HEADER_BYTES:], aad)
        except InvalidTag:
            raise StoreCorrupt(
                f"{where} does not decrypt: it was altered, or copied from another entry;"
                " not changed"
            ) from None
        return plaintext, kid != self.key_id
