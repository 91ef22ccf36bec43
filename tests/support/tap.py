"""A loopback TCP relay that records what passes through it, so a test can
see what a real jabberd2 component sent on the wire (e.g. that it did
STARTTLS). Bounded: it serves until stopped, every socket times out."""

import socket
import threading


class Tap:
    def __init__(self, target_ip, target_port, ip="127.0.0.1"):
        self.target = (target_ip, target_port)
        self.listener = socket.socket()
        self.listener.bind((ip, 0))
        self.listener.listen(16)
        self.listener.settimeout(0.5)
        self.ip, self.port = self.listener.getsockname()
        self.upstream = []              # one bytearray per accepted connection
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
            server = socket.create_connection(self.target, timeout=5)
            record = bytearray()
            self.upstream.append(record)
            for source, sink, log in ((client, server, record), (server, client, None)):
                threading.Thread(target=self._pump, args=(source, sink, log), daemon=True).start()

    def _pump(self, source, sink, log):
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
            if log is not None:
                log.extend(data)
            try:
                sink.sendall(data)
            except OSError:
                break
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self):
        self._stop.set()
        self.listener.close()
        self._thread.join(timeout=2)
