"""Parts of scripts/jrouter-probes: hostile and unlucky peers, one fresh router per probe.

    net.py         sockets from a chosen loopback address, component setup (benchlib.peers),
                   reading until EOF or quiet, stream errors and ids found in raw bytes
    bystanders.py  the pair of components that ping each other every 50 ms through the
                   router, as a process of its own (``python -m probelib.bystanders``)
    flood.py       a connect/close flood, as a process of its own (``python -m probelib.flood``)
    harness.py     one probe against one router: config, start, bystanders, RSS sampling,
                   the log, a crash, the stop; the result
    backlog.py     probes 1 and 2: a peer that stops reading, a disconnect with a backlog
    preauth.py     probe 3: memory from unauthenticated peers
    lockout.py     probe 4: silent connections, a connect/close flood
    auth.py        probe 5: wrong passwords and wrong handshakes
    nesting.py     probe 6: deep nesting on every parse path
    routes.py      probe 7: a <route/> with several payloads to an XEP-0114 component
    report.py      the markdown table, the notes, docs/reliability.md

Probe peers use the standard library only (and jrouter.testing's client
role, which needs no lxml): the script may run on a python3 without it.
The routers are started as jrouter-bench starts them (benchlib.routers).
"""
