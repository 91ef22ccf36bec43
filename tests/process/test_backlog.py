"""One read that holds a whole window (wire/outbox.py, ``on_backlog``): a
component that writes 500 routes to itself in one write gets all of them, in
order (jrouter: byte for byte; the C router writes them anew), and the
router keeps serving another component meanwhile. Run against both routers
(the ``router`` fixture)."""

from tests.support.cluster_nodes import ComponentPeer

COUNT = 500


def route(to, i):
    return ("<route to='%s' from='%s'><message xmlns='jabber:client' to='u@%s' id='b-%d'>"
            "<body>%s</body></message></route>" % (to, to, to, i, "x" * 150))


def test_a_window_sent_in_one_write_comes_back_whole_and_in_order(router, router_kind):
    address = (router.ip, router.port)
    echo = ComponentPeer.bound(address, "echo.test")
    other = ComponentPeer.bound(address, "other.test")
    try:
        routes = [route("echo.test", i) for i in range(COUNT)]
        echo.send("".join(routes))
        other.send(route("other.test", 0))
        got = [echo.take(lambda e: (e.attrs.get("to") == "echo.test"), 10.0, "route %d" % i)
               for i in range(COUNT)]
        assert [e.attrs.get("to") for e in got] == ["echo.test"] * COUNT
        assert [b"id='b-%d'" % i in e.raw for i, e in enumerate(got)] == [True] * COUNT
        if router_kind == "jrouter":
            assert [e.raw for e in got] == [r.encode() for r in routes]
        assert b"id='b-0'" in other.take(lambda e: e.attrs.get("to") == "other.test", 5.0,
                                         "other's route").raw
    finally:
        echo.close()
        other.close()
