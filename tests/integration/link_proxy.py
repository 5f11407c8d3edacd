"""A field link on 127.0.0.1 for tests: a TCP proxy between a SuperNode and the SuperLink that can go down (every
connection cut, new ones refused at once) and come back, as a cellular or satellite link does."""

from __future__ import annotations

import contextlib
import socket
import threading


class LinkProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target` while up."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target: int | None = None
        self.is_up = threading.Event()
        self.is_up.set()
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if not self.is_up.is_set() or self.target is None:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while self.is_up.is_set() and (data := source.recv(65536)):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            end.close()

    def down(self) -> None:
        """The link drops: every open connection is cut, new ones are refused until `up`."""
        self.is_up.clear()
        with self.lock:
            for connection in self.open:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            self.open = []

    def up(self) -> None:
        self.is_up.set()

    def close(self) -> None:
        self.down()
        self.listener.close()
