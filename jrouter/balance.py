"""Choosing one member of a cluster (several connections bound to one name).

Owns: the policies as small pure functions, from a member count and a key to
an index.  Today: jabberd2's own choice, bit for bit (spec §6.4).  Other
policies (consistent hashing, rendezvous, fixed slots) belong here too, with
the same shape: (member_count, key, ...) -> index in range(member_count).
Must not know: connections, route entries, XML, where the key came from
(which attribute is the key, `to`/`target`/`from`, is the caller's business:
spec §6.4 `pick`), or randomness: a random function is handed in.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Callable, Optional

from .jid import JID

__all__ = ["jabberd2_hash", "jabberd2_pick", "jabberd2_index"]

_WORDS = struct.Struct("<5I")  # SHA-1 as five 32-bit words, little-endian (Debian amd64)


def jabberd2_hash(bare_jid: str) -> int:
    """jabberd2's cluster hash of a prepped bare JID "node@domain".

    SHA-1 of the UTF-8 bytes, read as five little-endian 32-bit words; the C
    loop ends up XOR-ing only words 1, 2 and 3 (word 0 cancels itself, word 4
    is never read), then shifts right by 2.
    """
    _w0, w1, w2, w3, _w4 = _WORDS.unpack(hashlib.sha1(bare_jid.encode("utf-8")).digest())
    return (w1 ^ w2 ^ w3) >> 2


def jabberd2_index(member_count: int, bare_jid: str) -> int:
    """The member a bare JID maps to among `member_count` (plain modulo)."""
    return jabberd2_hash(bare_jid) % member_count


def jabberd2_pick(member_count: int, key: Optional[JID],
                  randint: Callable[[int], int]) -> int:
    """jabberd2's member choice: hash of key's bare JID, random without a node.

    A single member is chosen without consulting anything.  With no key, or a
    key without a node (e.g. a bare domain, or an invalid JID the caller
    turned into None — the C router would crash there), the index comes from
    `randint(member_count)`; it should return an int in range(n) (e.g.
    `random.randrange`), and any non-negative int is reduced mod n, so an
    emulation of glibc's rand() also fits.
    """
    if member_count < 1:
        raise ValueError("no members to pick from")
    if member_count == 1:
        return 0
    if key is None or not key.node:
        return randint(member_count) % member_count
    return jabberd2_index(member_count, key.bare)
