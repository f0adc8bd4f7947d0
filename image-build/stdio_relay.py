"""stdin/stdout <-> TCP relay for qemu's ``guestfwd=...-cmd:`` (one process per guest connection).

The boot test runs the Kafka broker on the host's loopback; qemu starts this for every connection the
guest opens to the guestfwd address and wires the guest socket to our stdin/stdout. A chardev
``tcp:`` guestfwd would connect once at qemu start and carry a single connection only.
Usage: stdio_relay.py HOST PORT
"""

from __future__ import annotations

import os
import socket
import sys
import threading


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    sock = socket.create_connection((host, port), timeout=10)
    sock.settimeout(None)

    def up() -> None:
        while data := os.read(0, 65536):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    threading.Thread(target=up, daemon=True).start()
    while data := sock.recv(65536):
        os.write(1, data)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError:
        sys.exit(1)
