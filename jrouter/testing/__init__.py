"""Peers for tests and the benchmark: the client roles jrouter itself never plays.

``component_client.ComponentClient`` is a component's side of the jabberd2
component protocol and of XEP-0114, sans-IO (header, STARTTLS up to
``<proceed/>``, SASL, restart, ``<bind/>``, ``<handshake/>``);
``sasl_client.DigestMD5Client`` is the DIGEST-MD5 client of jabberd2's sm and
c2s, which it uses.  The socket carriers live with their users
(``tests/support/peer.py``, ``tests/unit/harness.py`` in memory,
``scripts/benchlib/peers.py``).  Nothing in the router imports this package.
"""
