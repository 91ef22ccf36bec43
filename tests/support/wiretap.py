"""A loopback TCP relay that records both directions of every connection, timestamped.

Owns: sitting between jabberd2 components (sm, c2s) and the router, so a
test sees exactly what each side sent: every chunk as (monotonic time,
direction, bytes) per connection, in order. `Connection.elements()` cuts the recorded
streams into top-level elements (lxml's pull parser, so namespaces and
attributes come out as the peer wrote them).
Must not know: which router or component is on either side.

Bounded: it serves until stopped, every socket times out, nothing retries.
When one side closes, both sockets are shut down, as a proxy would.
"""

import threading
import time

from lxml import etree

from .relay import Relay

UP, DOWN = "up", "down"   # up: what the connecting component sent; down: what the router sent


class Connection:
    """One relayed connection: its chunks in arrival order, and its two sockets."""

    def __init__(self, number, client, server):
        self.number = number
        self.client, self.server = client, server
        self.chunks = []            # (time, UP | DOWN, bytes)
        self.lock = threading.Lock()
        self.closed = threading.Event()

    def data(self, direction):
        with self.lock:
            return b"".join(c for _t, d, c in self.chunks if d == direction)

    def elements(self, direction):
        """[(time of the chunk that completed it, element)] of the stream's top-level children.

        A stream restarts after SASL (and STARTTLS): each `<stream:stream` header
        begins a new document, parsed on its own."""
        with self.lock:
            chunks = [(t, c) for t, d, c in self.chunks if d == direction]
        data = b"".join(c for _t, c in chunks)
        starts = [i for i in _header_offsets(data)] or [0]
        bounds = list(zip(starts, starts[1:] + [len(data)]))
        ends, offset = [], 0               # (end offset, time) of each chunk
        for t, c in chunks:
            offset += len(c)
            ends.append((offset, t))
        out = []
        for start, stop in bounds:
            parser = etree.XMLPullParser(events=("start", "end"))
            depth, position = 0, start
            for end, t in ends:
                if end <= start or position >= stop:
                    continue
                piece = data[position:min(end, stop)]
                position += len(piece)
                try:
                    parser.feed(piece)
                    events = list(parser.read_events())
                except etree.XMLSyntaxError:
                    break
                for event, element in events:
                    if event == "start":
                        depth += 1
                    else:
                        depth -= 1
                        if depth == 1:
                            out.append((t, element))
        return out


def _header_offsets(data):
    """Where each stream document begins: its `<?xml` declaration, else its `<stream:stream`."""
    found, i = [], 0
    while True:
        j = data.find(b"<stream:stream", i)
        if j < 0:
            return found
        decl = data.rfind(b"<?xml", i, j)
        found.append(decl if decl >= 0 else j)
        i = j + 1


class WireTap(Relay):
    def __init__(self, target_ip, target_port, ip="127.0.0.1"):
        self.connections = []
        super().__init__(target_ip, target_port, ip)

    def _accepted(self, client, server):
        conn = Connection(len(self.connections) + 1, client, server)
        self.connections.append(conn)
        return [(client, server, UP, conn), (server, client, DOWN, conn)]

    def _chunk(self, conn, direction, data):
        with conn.lock:
            conn.chunks.append((time.monotonic(), direction, data))
        return data

    def _ended(self, conn, source, sink):
        conn.closed.set()
        super()._ended(conn, source, sink)
