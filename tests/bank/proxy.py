"""A small TCP proxy from 127.0.0.1 to PostgreSQL's Unix socket, through which
one replica reaches the database, so the tests can stall and cut that link;
or to a server's TCP port, so the client's tests can lose its answers."""

import contextlib
import logging
import socket
import threading
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)

_CHUNK_BYTES = 65536
# How often a stalled pump looks whether its link was dropped meanwhile.
_STALL_POLL_S = 0.05


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class TcpProxy:
    """Listens on 127.0.0.1:<port> and forwards each connection to a Unix
    socket (a Path) or a TCP address (host, port). stall() holds every byte
    in both directions until resume(); lose_answers() discards every byte
    back from upstream until deliver_answers(); drop() closes every
    connection at once, as a network failure would."""

    def __init__(self, upstream: Path | tuple[str, int]):
        self._target = upstream
        self._losing_answers = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_forever, name="proxy-accept", daemon=True)
        self._acceptor.start()

    def proxied_url(self, database_url: str) -> str:
        """The same database, reached through this proxy."""
        info = psycopg.conninfo.conninfo_to_dict(database_url)
        info.update(host="127.0.0.1", port=str(self.port))
        return psycopg.conninfo.make_conninfo(**info)

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def lose_answers(self) -> None:
        self._losing_answers.set()

    def deliver_answers(self) -> None:
        self._losing_answers.clear()

    def drop(self) -> int:
        """Closes every connection through the proxy; returns how many."""
        with self._lock:
            links, self._links = self._links, set()
        for link in links:
            link.close()
        return len(links)

    def close(self) -> None:
        self._closing.set()
        self._flowing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.drop()
        self._acceptor.join(timeout=5)

    def _accept_forever(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = self._connect_upstream()
            except OSError:
                # The upstream is down: the client sees its connection refused.
                client.close()
                continue
            link = _Link(client, upstream)
            with self._lock:
                self._links.add(link)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(link, source, sink),
                                 name="proxy-pump", daemon=True).start()

    def _connect_upstream(self) -> socket.socket:
        if isinstance(self._target, tuple):
            return socket.create_connection(self._target)
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(str(self._target))
        except OSError:
            upstream.close()
            raise
        return upstream

    def _pump(self, link: _Link, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(_CHUNK_BYTES)
                if not data:
                    break
                if source is link.upstream and self._losing_answers.is_set():
                    continue
                while not self._flowing.wait(_STALL_POLL_S):
                    if link.closed.is_set():
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            link.close()
            with self._lock:
                self._links.discard(link)
