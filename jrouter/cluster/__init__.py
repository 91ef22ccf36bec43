"""Several jrouter nodes acting as one router: the shared route table, without I/O.

Owns the cluster table's shape in etcd (``keys``: every key and value,
encoded and decoded in one place) and each node's in-memory mirror of it
(``mirror``: fed a snapshot and then etcd's watch batches, it keeps nodes,
members in one cluster-wide order, unique names, the default route and log
sinks, and says what changed as typed values). Routing reads the mirror, so
no packet waits on etcd; packets travel over direct node-to-node links.

Must not know: sockets, gevent, etcd's API or HTTP (the ops side turns its
responses into ``mirror.Put`` / ``Delete`` / ``Batch``, and writes the keys
``keys.Layout`` names), leases' timing, or the clock: times (a node's start,
a member's bind) are handed in as seconds since the epoch.
"""
