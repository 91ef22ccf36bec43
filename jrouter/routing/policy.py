"""Per-name clustering policies: the operator's `<clustering>` section of router.xml.

Owns: `ClusterPolicy` (one `<policy>`), `PolicyTable` (route name -> policy),
and the pure
decisions a policy makes for one packet: which stanza attribute is the key
(`key_attribute`), which string is hashed (`placement_key`) and where the
packet goes (`place`).  The algorithms and per-name state are balance.py's.
Must not know: connections, sockets, the clock, randomness (a random
function is handed in), or how the section is read (config/sections.py).

The section (jabberd2 ignores unknown elements, so one router.xml serves
both routers)::

    <clustering>
      <policy name='example.com' key='to' address='bare' algorithm='consistent'
              nodeless='hash' dead='failover' track-iq='yes' replace='half-open'/>
      <policy name='*.gateway.example.com' key='from' algorithm='slots' slots='4'
              dead='hold' hold='60'/>
    </clustering>

A name without a policy, and every attribute left out, behaves exactly as
jabberd2 2.7 (protocol §6.3): key `to` (or `target`) for names bound with
`multi`, `from` for XEP-0114 clusters, bare JID, modulo over the live
members in bind order, a random member for an address without a node, no
IQ tracking, a second connection simply joins.

Theory of operation, for the router core
----------------------------------------
Per clustered name, keep: its policy (`table.policy_for(name)`, once per
route, not per packet), a `balance.SlotTable(policy.slots)` when the
algorithm is not jabberd2, and share one `IqTracker` and one `HoldQueue`.

* Member joins: derive its identity (XEP-0114: the stream header's `from`
  if present; jabberd2 protocol: the name it bound *without* `multi`, e.g.
  an sm's `<id>`; else None) and `claim` a slot.  `SlotBusy` means a live
  connection has the same identity: with `replace='half-open'` close the
  old one (stream conflict), `release` its slot and claim again; with
  `'never'` claim(None), so the newcomer joins as an extra member as under
  jabberd2.  `SlotsFull`: refuse the bind.  Then deliver
  `holds.release(name, slot)`.
* Member leaves: `release(slot)`; with `dead='hold'` also
  `holds.down(name, slot, now, policy.hold_seconds)`.  Keep the route while
  slots are reserved and the dead policy is hold or bounce, or its packets
  would fall through to the default route (s2s) as under jabberd2.
* Packet: `placement_key(policy, address)` with `address` the value of
  `key_attribute(policy, legacy)` (for `to`, fall back to `target`; when
  both are missing, the route's `to`, as jabberd2), then `place(policy,
  key, live, known, randint)` with `live`/`known` from the SlotTable (for
  the jabberd2 algorithm: `range(len(members))`, members in bind order).
  DELIVER -> the member in that slot; HOLD -> `holds.hold(...)` and bounce
  what it returns; BOUNCE -> bounce (503 / service-unavailable).  Unlike
  jabberd2, a name whose algorithm is not jabberd2 must go through `place`
  even with one member, since its users may belong to a dead slot.
* With `track_iq`: an `<iq type='get'|'set' id=…>` sent by a member of the
  name is remembered as (id, from, to) -> member; an `<iq type='result'|
  'error'>` for the name first tries `take(id, to, from)` and goes to that
  member if it is still connected.  Timer: `holds.expired(now)` (bounce
  them) and `iqs.expire(now)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

from jrouter.routing.balance import MAX_SLOT_ID, fixed_slot, jabberd2_index, node_less_key, rendezvous_pick
from jrouter.errors import ConfigurationError
from jrouter.wire.jid import parse_jid

__all__ = ["ClusterPolicy", "PolicyTable", "PolicyError", "Choice", "match_name",
           "key_attribute", "placement_key", "place", "DEFAULT_POLICY",
           "DELIVER", "HOLD", "BOUNCE"]

# Values, named once.  The first of each tuple is jabberd2's behaviour (the default).
KEYS = (None, "to", "from")                   # None: 'to' for multi binds, 'from' for XEP-0114
ADDRESSES = ("bare", "full")
ALGORITHMS = ("jabberd2", "consistent", "slots")
DEAD = ("failover", "bounce", "hold")
NODELESS = ("random", "hash")
REPLACE = ("never", "half-open")
AFFINITY = ("none", "session", "traffic")      # affinity.MODES
# What place() decides for a packet.
DELIVER, HOLD, BOUNCE = "deliver", "hold", "bounce"


# Attribute readers: text in, value out, ValueError with a reason.


def match_name(value: str) -> str:
    """A route name, '*.' + a name, or '*'; names prepped as bind names are."""
    if value == "*":
        return value
    wild = value.startswith("*.")
    jid = parse_jid(value[2:] if wild else value)
    if jid is None or jid.node or jid.resource or "*" in jid.domain:
        raise ValueError(f"expected a name like 'example.com' or a wildcard like '*.example.com', got {value!r}")
    return "*." + jid.domain if wild else jid.domain


class PolicyError(ConfigurationError, ValueError):
    """A policy whose settings contradict each other; `problems` are (attribute, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{attr}: {message}" if attr else message for attr, message in problems))
        self.problems = problems


@dataclass(frozen=True)
class ClusterPolicy:
    """How one clustered name (or a wildcard of names) places its users."""

    match: str = "*"                # 'example.com', '*.example.com', or '*' for every name
    key: Optional[str] = None       # 'to' | 'from' | None (jabberd2: by bind kind)
    address: str = "bare"           # 'bare' | 'full' JID is hashed
    algorithm: str = "jabberd2"     # 'jabberd2' | 'consistent' | 'slots'
    slots: Optional[int] = None     # the slot count, for algorithm 'slots' only
    dead: str = "failover"          # 'failover' | 'bounce' | 'hold': a dead slot's traffic
    hold_seconds: int = 30          # grace period for dead='hold'
    nodeless: str = "random"        # 'random' (jabberd2) | 'hash' for an address without a node
    track_iq: bool = False          # IQ results/errors back to the member that asked
    replace: str = "never"          # 'never' | 'half-open': same identity replaces the old connection
    affinity: str = "none"          # 'none' | 'session' (sm) | 'traffic' (gateways): affinity.py
    affinity_idle: Optional[int] = None   # seconds; None: affinity.DEFAULT_IDLE for the mode
    affinity_max: int = 100_000     # entries kept per name

    def __post_init__(self) -> None:
        problems = _policy_problems(self)
        if problems:
            raise PolicyError(problems)


_CHOICES = {"key": KEYS, "address": ADDRESSES, "algorithm": ALGORITHMS, "dead": DEAD,
            "nodeless": NODELESS, "replace": REPLACE, "affinity": AFFINITY}


def _policy_problems(p: ClusterPolicy) -> list[tuple[str, str]]:
    """Every way `p` is invalid, as (attribute name in router.xml, message)."""
    problems = [(name, f"must be one of {_listing(allowed)}, got {getattr(p, name)!r}")
                for name, allowed in _CHOICES.items() if getattr(p, name) not in allowed]
    try:
        if match_name(p.match) != p.match:
            problems.append(("name", f"must be prepped (lower case), got {p.match!r}"))
    except ValueError as exc:
        problems.append(("name", str(exc)))
    if p.affinity == "none" and (p.affinity_idle is not None or p.affinity_max != 100_000):
        problems.append(("affinity", "affinity-idle and affinity-max need affinity='session' "
                                     "or 'traffic'"))
    if p.affinity_idle is not None and p.affinity_idle < 1:
        problems.append(("affinity-idle", f"must be at least 1 second, got {p.affinity_idle}"))
    if p.affinity_max < 1:
        problems.append(("affinity-max", f"must be at least 1, got {p.affinity_max}"))
    if p.algorithm == "slots" and p.slots is None:
        problems.append(("slots", "algorithm='slots' needs the slot count, e.g. slots='4'"))
    if p.slots is not None and p.algorithm != "slots":
        problems.append(("slots", "is only used with algorithm='slots'"))
    if p.slots is not None and not 1 <= p.slots <= MAX_SLOT_ID + 1:
        problems.append(("slots", f"must be between 1 and {MAX_SLOT_ID + 1}, got {p.slots}"))
    if p.algorithm == "jabberd2" and p.dead != "failover":
        problems.append(("dead", f"dead={p.dead!r} needs algorithm='consistent' or 'slots' "
                                 "(jabberd2's algorithm has no slot to wait for)"))
    if p.hold_seconds < 1:
        problems.append(("hold", f"must be at least 1 second, got {p.hold_seconds}"))
    return problems


def _listing(allowed: Sequence[Optional[str]]) -> str:
    return ", ".join(repr(a) for a in allowed if a is not None)


DEFAULT_POLICY = ClusterPolicy()  # jabberd2 2.7's behaviour


# ---------------------------------------------------------------------------
# Per-packet decisions.


class Choice(NamedTuple):
    """Where a packet goes: DELIVER to `slot`; HOLD or BOUNCE for dead slot `slot` (None: no slot)."""

    action: str
    slot: Optional[int]


def key_attribute(policy: ClusterPolicy, legacy: bool) -> str:
    """The stanza attribute that is hashed: the policy's, else jabberd2's by bind kind.

    `legacy` says the name was first bound by a XEP-0114 component.  For
    'to', jabberd2 falls back to the `target` attribute (session starts).
    """
    return policy.key or ("from" if legacy else "to")


def placement_key(policy: ClusterPolicy, address: Optional[str]) -> Optional[str]:
    """The string to hash for `address`, or None for "pick at random" (jabberd2).

    An address with a node gives its bare or full JID.  Without a node, or
    not a JID at all (the C router crashes there), jabberd2 picks at random;
    with nodeless='hash' the domain (or full JID, or raw text) is hashed.
    """
    if address is None:
        return None
    jid = parse_jid(address)
    if jid is not None and jid.node:
        return jid.full if policy.address == "full" else jid.bare
    if policy.nodeless == "hash":
        return node_less_key(jid, address, policy.address == "full")
    return None


def place(policy: ClusterPolicy, key: Optional[str], live: Sequence[int],
          known: Sequence[int], randint: Callable[[int], int]) -> Choice:
    """Where a packet with placement key `key` goes.

    `live`: the slot ids with a connected member (for the jabberd2 algorithm,
    member indices in bind order); `known`: live plus those reserved for
    absent members (SlotTable.known()).  `randint(n)` returns an int in
    range(n), for keys that are None.  With nobody live, a slot algorithm
    still applies its dead policy (hold: the only instance may be
    restarting); otherwise the packet bounces.
    """
    if policy.algorithm == "jabberd2" or key is None:
        return _anywhere(key, live, randint)
    if policy.algorithm == "consistent" and not known and not live:
        return Choice(BOUNCE, None)  # no slot was ever held: nothing to wait for
    home = _home(policy, key, known or live)
    if home in live:
        return Choice(DELIVER, home)
    return _DEAD_SLOT[policy.dead](key, home, live)


def _anywhere(key: Optional[str], live: Sequence[int], randint: Callable[[int], int]) -> Choice:
    """jabberd2's choice (protocol §6.3): hash modulo the live count, or rand() without a key."""
    count = len(live)
    if count == 0:
        return Choice(BOUNCE, None)
    if count == 1:
        return Choice(DELIVER, live[0])  # jabberd2 asks neither hash nor rand() then
    if key is None:
        return Choice(DELIVER, live[randint(count) % count])
    return Choice(DELIVER, live[jabberd2_index(count, key)])


def home_slot(policy: ClusterPolicy, key: str, known: Sequence[int]) -> int:
    """The slot `key` belongs to under a slot algorithm, alive or not."""
    return _home(policy, key, known)


def _home(policy: ClusterPolicy, key: str, known: Sequence[int]) -> int:
    """The slot `key` belongs to, alive or not."""
    if policy.slots is not None:  # set exactly when algorithm='slots' (_policy_problems)
        return fixed_slot(key, policy.slots)
    return rendezvous_pick(key, known)


def _failover(key: str, home: int, live: Sequence[int]) -> Choice:
    # The key's next choice among the live slots: a dead slot's users spread
    # evenly over the survivors and nobody else moves.
    if not live:
        return Choice(BOUNCE, home)
    return Choice(DELIVER, rendezvous_pick(key, live))


# dead policy -> what a packet for a dead slot gets
_DEAD_SLOT: dict[str, Callable[[str, int, Sequence[int]], Choice]] = {
    "failover": _failover,
    "bounce": lambda key, home, live: Choice(BOUNCE, home),
    "hold": lambda key, home, live: Choice(HOLD, home),
}


# ---------------------------------------------------------------------------
# Which policy applies to a name.


class PolicyTable:
    """Route names -> policies: exact name first, then the longest wildcard, then '*'."""

    def __init__(self, policies: Iterable[ClusterPolicy] = (),
                 default: ClusterPolicy = DEFAULT_POLICY) -> None:
        self._exact: dict[str, ClusterPolicy] = {}
        self._wild: dict[str, ClusterPolicy] = {}  # '*.example.com' stored as 'example.com'
        self.default = default
        for p in policies:
            if p.match == "*":
                self.default = p
            elif p.match.startswith("*."):
                self._wild[p.match[2:]] = p
            else:
                self._exact[p.match] = p

    def policy_for(self, name: str) -> ClusterPolicy:
        """The policy of a (prepped) route name."""
        policy = self._exact.get(name)
        if policy is not None:
            return policy
        rest = name
        while self._wild and "." in rest:  # a.b.example.com: *.b.example.com, *.example.com, *.com
            rest = rest.split(".", 1)[1]
            policy = self._wild.get(rest)
            if policy is not None:
                return policy
        return self.default

    def policies(self) -> list[ClusterPolicy]:
        """Every configured policy (for the operator's view)."""
        return list(self._exact.values()) + list(self._wild.values()) + [self.default]
