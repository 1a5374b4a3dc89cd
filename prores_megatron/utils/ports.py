"""A free TCP port on the loopback interface, for a local rendezvous (gloo init, torchrun)."""

import socket


def free_port() -> int:
    """Return a port the OS reports free on 127.0.0.1 right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
