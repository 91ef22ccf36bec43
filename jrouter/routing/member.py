"""What routing needs of a member of a name, wherever the member is.

A name's members are this router's own connections (``wire.connection.
Connection``) and, on a node of a cluster, members bound on other nodes
(``cluster_view.RemoteMember``, docs/cluster.md §3). The route table,
membership, placement and affinity hold either kind and use only what this
protocol names, so neither has to pretend to be the other.

Compiled code checks a parameter typed with a class on every call
(docs/architecture.md, compiled), so those modules type members with this
protocol, never with ``Connection``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Protocol

if TYPE_CHECKING:
    from jrouter.wire.connection import Connection, ContextKey
    from jrouter.wire.counters import Counters
    from jrouter.wire.xmlstream import Element


class MemberPort(Protocol):
    """The part of a protocol port (``ports.Port``, ``cluster_view.RemotePort``)
    routing uses through a member."""

    advertised: bool

    # ``target``/``member``: a member of this port's own kind (a port only
    # ever gets its own members, so each port types it as that kind).
    def outbound(self, target: Any, route: Element, key: Optional[ContextKey]) -> bytes: ...

    def identity(self, member: Any) -> Optional[str]: ...


class RouteMember(Protocol):
    """One member of a name: where its packets go and how it is called in logs."""

    @property
    def names(self) -> dict[str, str]:
        """The names it is bound to (an ordered set) -> bind kind."""

    @property
    def label(self) -> str: ...

    @property
    def ip(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def user(self) -> Optional[str]: ...

    @property
    def counters(self) -> Counters: ...

    @property
    def protocol_port(self) -> MemberPort: ...

    def send(self, data: bytes) -> None:
        """Router-made bytes (advertisements), outside the throttle."""

    def deliver(self, data: bytes, route: Optional[Element] = None,
                key: Optional[ContextKey] = None, sender: Optional[Connection] = None) -> None:
        """A routed packet: ``route`` with its sender's namespace ``key``
        (a sender is always one of this router's own connections: another
        node's packets are bounced by that node)."""
