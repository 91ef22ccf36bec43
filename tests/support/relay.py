"""Loopback TCP relays between a test's peer and a server: the accepting and
pumping they share (`Relay`), and one that can go deaf one way and be cut
(`MutingRelay`), for links lost between two live processes.

Owns: one listening socket, and per accepted connection the connection to
the target and two pump threads. A subclass decides what a pump does with
each chunk (`_chunk`) and when a connection ends. Bounded: every socket
times out, the threads are daemons, `stop` ends them all.
"""

import socket
import struct
import threading


class Relay:
    """Accept on `ip` (a free port), connect each client to `target`, pump both ways."""

    def __init__(self, target_ip, target_port, ip="127.0.0.1"):
        self.target = (target_ip, target_port)
        self.listener = socket.socket()
        self.listener.bind((ip, 0))
        self.listener.listen(16)
        self.listener.settimeout(0.5)
        self.ip, self.port = self.listener.getsockname()[:2]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for source, sink, direction, conn in self._accepted(client, server):
                threading.Thread(target=self._pump, args=(conn, source, sink, direction),
                                 daemon=True).start()

    def _accepted(self, client, server):
        """A new pair: [(source, sink, direction, per-connection state)] for
        its two pumps; the direction is the subclass's tag (here True: client
        to target, False: back)."""
        return [(client, server, True, None), (server, client, False, None)]

    def _chunk(self, conn, direction, data):
        """What to pass on of `data`; b'' passes nothing."""
        return data

    def _ended(self, conn, source, sink):
        """One direction is over: shut both sockets down, as a proxy would."""
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _pump(self, conn, source, sink, direction):
        source.settimeout(1.0)
        while not self._stop.is_set():
            try:
                data = source.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            data = self._chunk(conn, direction, data)
            if not data:
                continue
            try:
                sink.sendall(data)
            except OSError:
                break
        self._ended(conn, source, sink)

    def stop(self):
        self._stop.set()
        self.listener.close()
        self._thread.join(timeout=2)


class MutingRelay(Relay):
    """`mute` drops what the target writes back (a peer link's <a/>
    acknowledgements among it) while the other way still passes; `cut`
    resets every relayed connection at once, so both ends see the link lost
    while both are alive."""

    def __init__(self, target_ip, target_port, ip="127.0.0.1"):
        self.mute = False
        self._socks = []
        self._lock = threading.Lock()
        super().__init__(target_ip, target_port, ip)

    def _accepted(self, client, server):
        with self._lock:
            self._socks += [client, server]
        return super()._accepted(client, server)

    def _chunk(self, conn, direction, data):
        return b"" if self.mute and not direction else data

    def cut(self):
        """Reset every relayed connection (SO_LINGER 0): both ends see it lost."""
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            except OSError:
                pass

    def stop(self):
        super().stop()
        self.cut()
