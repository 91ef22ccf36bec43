"""What a node's view of the cluster table asks its shell to write to etcd
(issue 13): the effects ``ClusterView.take_effects`` returns, as plain values.

Owns: one value per kind of write (member keys, log sink keys, claims of
unique names and of the default route, slot claims, releases) and what a
node holds to write again under a new lease (``HeldName``).
Must not know: etcd, keys' bytes (``jrouter/cluster/keys.py``), sockets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Union

if TYPE_CHECKING:
    from jrouter.wire.connection import Connection


@dataclass(frozen=True)
class RegisterMember:
    """Put ``members/<name>/<node>/<member>`` (under the node's lease)."""

    name: str
    member: str
    kind: str
    identity: Optional[str]


@dataclass(frozen=True)
class LogSinkKey:
    """Put (``bound``, under the node's lease) or delete ``logs/<name>/<node>/<member>``."""

    name: str
    member: str
    bound: bool


@dataclass(frozen=True)
class UnregisterMember:
    """Delete a member key this node put."""

    name: str
    member: str


@dataclass(eq=False)
class Claim:
    """A bind waiting for etcd: ``unique/<name>`` and/or the default route
    for ``member``. The shell answers with ``ClusterView.claimed``."""

    connection: Connection
    name: str
    member: str
    unique: bool
    default: bool
    #: resume(refusal, now): the bind goes on (refusal None) or is answered
    #: with the error code ("409": taken; "503": etcd did not answer)
    resume: Callable[[Optional[str], float], None] = field(repr=False)
    #: the holder on another node was asked to end (replace='half-open'):
    #: a taken ``unique/<name>`` is waited for, within bind-wait
    replacing: bool = False


@dataclass(frozen=True)
class ReleaseClaim:
    """Delete ``unique/<name>`` and/or the default route, if ``member`` still holds them."""

    name: str
    member: str
    unique: bool
    default: bool


@dataclass(frozen=True)
class HeldName:
    """A name a local connection holds (``ClusterView.held_names``): its
    member key, ``unique/<name>`` when its kind is single, the default route."""

    name: str
    member: str
    kind: str
    identity: Optional[str]
    default: bool
    sink: bool = False          # the name's log sink (logs/<name>/<node>/<member>)


@dataclass(eq=False)
class ClaimSlot:
    """A member of a name under a slot policy waiting for its slot: the shell
    asks ``ClusterSlots.choose`` which to take (again after a txn that
    lost a race) and answers with ``ClusterSlots.claimed``."""

    connection: Connection
    name: str
    member: str
    kind: str
    identity: Optional[str]
    #: resume(slot, refusal, now): the member joins in that slot (refusal
    #: None) or is refused ("409": no slot left; "503": etcd did not answer)
    resume: Callable[[Optional[int], Optional[str], float], None] = field(repr=False)


@dataclass(frozen=True)
class SlotChoice:
    """What to write for a ClaimSlot: take ``slot`` if its key is still at
    ``mod_revision`` (0: absent); ``held``: the slot key names this member
    already (an answer lost on the way), nothing to write; ``replacing``:
    nothing yet: the instance's old member on another node was asked to end
    (replace='half-open'), choose again once it has left the table."""

    slot: int
    mod_revision: int
    held: bool = False
    replacing: Optional[tuple[str, str]] = None     # (node, member) asked to end


Effect = Union[RegisterMember, UnregisterMember, Claim, ClaimSlot, ReleaseClaim, LogSinkKey]
