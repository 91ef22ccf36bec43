"""Many connections, no sockets: what the router does with a packet.

Owns: the ``Router`` (``router``: connections, unicast, broadcast, throttle),
the route table (``table``), the protocol ports that turn a peer's packets
into routes and routes into a peer's bytes (``ports`` for jabberd2's
component protocol, ``accept`` for XEP-0114), names joining and leaving
(``membership``), the one placement object that picks the member of a
clustered name (``placement``, with ``policy`` and ``balance``), the filter
(``filter``), connection access rules (``access``), the limits on peers
that have not authenticated (``guard``) and the message log's lines
(``message_log``).

Must not know: sockets, gevent, files or the clock. Time comes in as ``now``;
what must be written to a file leaves as a value the shell writes
(``ops``).
"""
