"""A port of a network namespace brought out to this one's loopback: the tests (and a browser)
reach a server that listens inside a stand-in Mac's namespace. Each connection is dialled from a
thread that joined the namespace (setns changes only the calling thread's), then its bytes are
pumped both ways. Linux and root only, as tests/netns.py."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000


def _join(namespace: str) -> None:
    """Moves the calling thread into the namespace (`ip netns add` keeps it under /run/netns)."""
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace} failed")
    finally:
        os.close(fd)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _serve(client: socket.socket, namespace: str, host: str, port: int) -> None:
    """On a thread of its own, which joins the namespace for good and dies with the connection."""
    try:
        _join(namespace)
        inside = socket.create_connection((host, port), timeout=5)
        inside.settimeout(None)
    except OSError:
        client.close()
        return
    back = threading.Thread(target=_pump, args=(inside, client), daemon=True)
    back.start()
    _pump(client, inside)
    back.join()
    client.close()
    inside.close()


@contextlib.contextmanager
def forwarded(namespace: str, port: int, host: str = "127.0.0.1") -> Iterator[int]:
    """A port on 127.0.0.1 here whose connections reach host:port inside the namespace."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            args = (client, namespace, host, port)
            threading.Thread(target=_serve, args=args, daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()
