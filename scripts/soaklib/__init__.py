"""Parts of scripts/jrouter-soak: a long run with mixed traffic and churn, every packet accounted.

    ledger.py   the books: sequence numbers, packets in flight, bounces expected or not,
                broadcasts owed to each connection, what was lost
    stanzas.py  the packets of both protocols and what a received element means
    peer.py     one component over its life (connect, bind, unbind, leave), its socket
    engine.py   every component in one event loop; the paced traffic and the churn
    loadgen.py  the load generator process (``python -m soaklib.loadgen SPEC``)
    report.py   the RSS curve, p99 over time, the totals and the verdict

The routers themselves are started as jrouter-bench starts them (benchlib.routers).
"""
