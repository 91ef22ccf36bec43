"""Parts of scripts/jrouter-bench: routers under test, load generator, report.

    routers.py  config files, start/stop a router process, its CPU and memory from /proc
    cluster.py  several jrouter nodes as one router: one etcd, k nodes, their /status
    peers.py    the components: XEP-0114 and jabberd2-protocol setup, then a
                non-blocking engine that keeps a window of messages in flight
    loadgen.py  the load generator process (``python -m benchlib.loadgen SPEC``)
    report.py   statistics and the aligned tables
"""
