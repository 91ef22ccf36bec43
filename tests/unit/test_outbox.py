"""wire.outbox.Outbox against a model: whatever the writes, the routes
handed back on a disconnect are exactly the packets the peer's socket never
took in full, in order (protocol §6.6)."""

from hypothesis import given, settings, strategies as st

from jrouter.wire.counters import Counters
from jrouter.wire.outbox import Outbox

STEPS = st.lists(st.one_of(
    st.tuples(st.just("deliver"), st.integers(1, 40)),
    st.tuples(st.just("send"), st.integers(1, 40)),
    st.tuples(st.just("write"), st.floats(0, 1)),          # share of what is pending
), max_size=60)


@settings(max_examples=400, deadline=None)
@given(STEPS, st.booleans())
def test_unsent_routes_are_exactly_what_the_socket_never_took(steps, last_write_whole):
    outbox = Outbox(Counters())
    stream = []            # (end offset, route or None) of every packet, in order
    size = 0               # bytes queued in all
    handed = acked = 0     # bytes handed to the shell / written by it
    pending = b""          # handed and not written yet
    for n, (op, arg) in enumerate(steps):
        if op in ("deliver", "send"):
            data = bytes([65 + n % 26]) * arg
            size += arg
            if op == "deliver":
                route = f"route-{n}"
                outbox.deliver(data, route)
            else:
                route = None
                outbox.send(data)
            stream.append((size, route))
        else:
            pending += outbox.data_to_send()
            handed = acked + len(pending)
            count = int(len(pending) * arg)
            outbox.sent(count)
            acked += count
            pending = pending[count:]
    if last_write_whole:
        pending += outbox.data_to_send()
        outbox.sent(len(pending))
        acked += len(pending)
        handed = acked
    assert handed >= acked
    expected = [route for end, route in stream if route is not None and end > acked]
    assert [route for route, _key, _sender in outbox.take_unsent()] == expected
