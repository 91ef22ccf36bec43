"""A loopback TCP relay that records what passes through it, so a test can
see what a real jabberd2 component sent on the wire (e.g. that it did
STARTTLS). Bounded: it serves until stopped, every socket times out."""

from .relay import Relay


class Tap(Relay):
    def __init__(self, target_ip, target_port, ip="127.0.0.1"):
        self.upstream = []              # one bytearray per accepted connection
        super().__init__(target_ip, target_port, ip)

    def _accepted(self, client, server):
        record = bytearray()
        self.upstream.append(record)
        return [(client, server, True, record), (server, client, False, None)]

    def _chunk(self, record, direction, data):
        if record is not None:
            record.extend(data)
        return data
