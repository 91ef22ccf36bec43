"""One connection, no routing.

Owns: the XML stream reader (``xmlstream``, with ``lxml_side``) and writer
(``xmlwrite``), JIDs (``jid``), SASL
DIGEST-MD5 (``sasl``), the per-connection traffic figures (``counters``) and
``connection``: one peer's negotiation for both protocols (jabberd2's
component protocol and XEP-0114) with its one state table, and its output
buffer.

Must not know: other connections, names, routes or placement (an
authenticated peer's packets are handed to the router it was given), and
nothing here touches a socket, gevent, a file or the clock.
"""
