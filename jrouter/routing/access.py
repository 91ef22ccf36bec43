"""IP access rules and rate counters: the pure checks made on an accepted socket.

Owns the semantics of ``<io><access>`` (jabberd2 ``util/access.c``, protocol §3.1
step 1) and of the ``<io><limits>`` counters (``util/rate.c``, protocol §3.1
step 2 and §3.9).  Nothing here reads files, sockets or the clock: ``jrouter.config`` builds
the rules, and the caller passes the peer address and the current time.

Theory of operation
-------------------
An access rule is an address plus a prefix length.  A peer matches a rule when
the first ``prefix`` bits agree; an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``,
what a dual-stack ``::`` listener reports for IPv4 peers) is compared as the
IPv4 address it carries, in either direction, exactly like
``_access_check_match``.  ``AccessRules.allows`` then applies Apache-style
ordering: ``allow,deny`` allows unless only a deny rule matches; ``deny,allow``
denies unless only an allow rule matches.

A ``RateCounter`` is ``util/rate.c`` with the clock passed in: the window opens
at the first event and resets when ``seconds`` have passed since it opened;
when the count reaches ``total`` the source goes "bad" and stays bad until
``throttle`` seconds have passed since then.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Optional, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

ALLOW_DENY = "allow,deny"
DENY_ALLOW = "deny,allow"

# jabberd2's router.c passes this when a rule has no mask attribute, whatever
# the address family of the rule (see parse_mask).
DEFAULT_MASK = "255.255.255.255"


def parse_mask(mask: Optional[str], version: int) -> int:
    """Turn a ``mask`` attribute into a prefix length for a rule of IP ``version``.

    A dotted IPv4 mask becomes 32 minus its trailing zero bits, as
    ``_access_calc_netsize`` counts them; anything else must be a prefix length.
    Raises ``ValueError`` (with a message for the operator) on garbage, where
    jabberd2's ``atoi`` would silently give 0 and so match every address.

    Quirk kept from jabberd2: a rule without a mask gets ``255.255.255.255``
    even when the rule is IPv6, so an IPv6 rule without mask is a /32, not
    a /128.  Operators who want one IPv6 host must write ``mask='128'``.
    """
    if mask is None:
        mask = DEFAULT_MASK
    try:
        dotted = ipaddress.IPv4Address(mask)
    except ValueError:
        dotted = None
    if dotted is not None:
        bits = int(dotted)
        trailing = (bits & -bits).bit_length() - 1 if bits else 32
        if bits != (0xFFFFFFFF << trailing) & 0xFFFFFFFF:
            # jabberd2 only counts the trailing zeros, so 255.0.255.0 acts as
            # /24; a mask with holes is always a typo, so we refuse it.
            raise ValueError(f"netmask {mask!r} is not contiguous")
        return 32 - trailing
    text = mask.strip(" \t\r\n")
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"mask {mask!r} is neither a dotted IPv4 netmask nor a prefix length")
    prefix = int(text)
    limit = 32 if version == 4 else 128
    if prefix > limit:
        raise ValueError(f"prefix length {prefix} is larger than {limit}")
    return prefix


@dataclass(frozen=True)
class AccessRule:
    """One ``<allow/>`` or ``<deny/>``: an address and how many leading bits must agree."""

    address: IPAddress
    prefix: int

    @classmethod
    def parse(cls, ip: str, mask: Optional[str] = None) -> "AccessRule":
        """Build a rule from the ``ip`` and ``mask`` attributes; ``ValueError`` if invalid."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"{ip!r} is not an IPv4 or IPv6 address") from None
        return cls(address, parse_mask(mask, address.version))

    def matches(self, peer: IPAddress) -> bool:
        """True if ``peer`` lies within this rule (``_access_check_match``)."""
        return _same_subnet(peer, self.address, self.prefix)


def _same_subnet(a: IPAddress, b: IPAddress, prefix: int) -> bool:
    if a.version != b.version:
        # One side may be an IPv4-mapped IPv6 address: compare it as IPv4.
        # A mapped rule's prefix counts the 96 bits of ::ffff: too.
        mapped_a = getattr(a, "ipv4_mapped", None)
        mapped_b = getattr(b, "ipv4_mapped", None)
        if mapped_a is None and mapped_b is None:
            return False
        if prefix > 96:
            prefix -= 96
        return _same_subnet(mapped_a or a, mapped_b or b, prefix)
    width = a.max_prefixlen
    prefix = min(prefix, width)
    # jabberd2 computes the IPv4 mask as ``~0u << (32 - prefix)``, which for
    # prefix 0 is undefined behaviour; on x86 it yields an all-ones mask, so
    # ``mask='0.0.0.0'`` matches only the rule's own address there (observed
    # on Debian's binary).  We implement the evident intent: /0 matches all.
    shift = width - prefix
    return (int(a) >> shift) == (int(b) >> shift)


@dataclass(frozen=True)
class AccessRules:
    """The ``<io><access>`` section: order plus allow and deny rules, in file order."""

    order: str = ALLOW_DENY
    allow: tuple[AccessRule, ...] = ()
    deny: tuple[AccessRule, ...] = ()

    def allows(self, ip: str) -> bool:
        """Whether a peer at textual address ``ip`` may connect (``access_check``).

        An address that does not parse is refused, as jabberd2 does.
        """
        try:
            peer = ipaddress.ip_address(ip)
        except ValueError:
            return False
        allowed = any(rule.matches(peer) for rule in self.allow)
        denied = any(rule.matches(peer) for rule in self.deny)
        if self.order == DENY_ALLOW:
            return allowed and not denied
        return allowed or not denied


@dataclass(frozen=True)
class RateLimit:
    """A ``<bytes>`` or ``<connects>`` limit: ``total`` events per ``seconds``, else ``throttle`` s off.

    ``total == 0`` disables the limit.
    """

    total: int = 0
    seconds: int = 5
    throttle: int = 5

    @property
    def enabled(self) -> bool:
        return self.total > 0


class RateCounter:
    """``util/rate.c``'s ``rate_t``: mutable, but pure; every call takes ``now`` (seconds)."""

    __slots__ = ("total", "seconds", "throttle", "start", "count", "bad_since")

    def __init__(self, limit: RateLimit) -> None:
        self.total = limit.total
        self.seconds = limit.seconds
        self.throttle = limit.throttle
        self.start: Optional[float] = None  # window start; rate.c uses time 0 for "none"
        self.count = 0
        self.bad_since: Optional[float] = None

    def reset(self) -> None:
        """Forget all events (``rate_reset``)."""
        self.start = None
        self.count = 0
        self.bad_since = None

    def add(self, now: float, count: int = 1) -> None:
        """Record ``count`` events at time ``now`` (``rate_add``)."""
        if self.start is not None and now - self.start >= self.seconds:
            self.reset()
        self.count += count
        if self.start is None:
            self.start = now
        if self.count >= self.total:
            self.bad_since = now

    def left(self) -> int:
        """Events still allowed in this window; 0 while bad (``rate_left``)."""
        if self.bad_since is not None:
            return 0
        return self.total - self.count

    def check(self, now: float) -> bool:
        """False while the source is being throttled; ends the penalty when due (``rate_check``)."""
        if self.start is None or self.count < self.total:
            return True
        if self.bad_since is not None:
            if now - self.bad_since >= self.throttle:
                self.reset()
                return True
            return False
        return True

    def idle(self, now: float) -> bool:
        """True when forgetting this counter would change nothing (a fresh one acts the same)."""
        if self.start is None:
            return True
        if self.bad_since is not None:
            return now - self.bad_since >= self.throttle
        return now - self.start >= self.seconds


#: Counters kept before the idle ones are forgotten.
PRUNE_AT = 1024
#: Counters kept at most: past it the oldest still counting are forgotten too.
MAX_COUNTERS = 16384


class AddressCounters:
    """One ``RateCounter`` per source address, in memory bounded whatever
    the addresses (ours: jabberd2 keeps one per IP string forever).

    At ``PRUNE_AT`` counters the idle ones go, which never changes a
    verdict. Past ``max_size`` (a scan from a whole IPv6 prefix) the
    oldest counters that are not refusing yet go too: such an address
    starts counting afresh. A refusing counter goes last, and only when
    every counter is refusing.
    """

    __slots__ = ("limit", "counters", "max_size")

    def __init__(self, limit: RateLimit, max_size: int = MAX_COUNTERS) -> None:
        self.limit = limit
        self.counters: dict[str, RateCounter] = {}   # in the order first counted
        self.max_size = max_size

    def __len__(self) -> int:
        return len(self.counters)

    def get(self, ip: str) -> Optional[RateCounter]:
        """The counter of ``ip``, or None when it has none."""
        return self.counters.get(ip)

    def counter(self, ip: str, now: float) -> RateCounter:
        """The counter of ``ip``, made (and room made for it) if it has none."""
        counter = self.counters.get(ip)
        if counter is None:
            if len(self.counters) >= PRUNE_AT:
                self._prune(now)
            counter = self.counters[ip] = RateCounter(self.limit)
        return counter

    def _prune(self, now: float) -> None:
        counters = self.counters
        for ip in [ip for ip, c in counters.items() if c.idle(now)]:
            del counters[ip]
        excess = len(counters) - self.max_size + 1
        if excess <= 0:
            return
        counting = [ip for ip, c in counters.items() if c.bad_since is None]
        refusing = [ip for ip, c in counters.items() if c.bad_since is not None]
        for ip in (counting + refusing)[:excess]:
            del counters[ip]


@dataclass
class ConnectLimiter:
    """Per-source-IP connect counters for ``<limits><connects>`` (``_router_accept_check``)."""

    limit: RateLimit
    counters: AddressCounters = field(init=False)

    def __post_init__(self) -> None:
        self.counters = AddressCounters(self.limit)

    def admit(self, ip: str, now: float) -> bool:
        """Count a connect from ``ip`` at ``now``; False if it must be refused."""
        if not self.limit.enabled:
            return True
        counter = self.counters.counter(ip, now)
        if not counter.check(now):
            return False
        counter.add(now)
        return True
