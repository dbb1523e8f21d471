"""Stops every process of a multi-process run at once when one of them dies.

Why: with jax 0.10 a collective whose peer was killed does not fail — gloo (CPU) waits on the dead
socket — and the survivors only stop when the coordination service misses the peer's heartbeats
(`--heartbeat-timeout`), by aborting with a C++ stack trace. A process that dies (crash, OOM kill,
SIGKILL, an error exit) closes its sockets at once, so a TCP connection per process is a fast and
exact death signal:

  process 0 listens (its address goes through the coordination service's key-value store) and every
  other process connects to it. A connection that closes without a `done` message means its process
  died: process 0 tells the other processes which one, and each survivor prints one line naming the
  lost process and the fix, and exits with status `EXIT_CODE` without waiting on collectives.

A clean finish sends `done` first (`PeerWatch.close`), so a process that ends normally, or a peer
that finishes a moment earlier, is not mistaken for a death. A machine that vanishes without
closing its sockets (power loss, network partition) is still caught by JAX's heartbeat timeout.
"""
from __future__ import annotations

import os
import select
import socket
import sys
import threading

EXIT_CODE = 3  # a multi-process run lost a peer: restart every process with the same command
_ADDRESS_KEY = "g2vlm/peer_watch/address"
_DONE = b"D"
_CONNECT_TIMEOUT_MS = 300_000


def stop_after_peer_failure(what: str) -> None:
    """Prints one line naming this process, what happened and the fix; exits with EXIT_CODE at once
    (a normal interpreter exit would wait on the distributed shutdown barrier of the dead peer)."""
    import jax

    print(f"g2vlm: process {jax.process_index()} of {jax.process_count()} stopped: a peer process died or the "
          f"network failed ({what}). Restart every process with the same command; training resumes from "
          "the newest complete checkpoint.", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_CODE)


class PeerWatch:
    """One TCP connection between process 0 and every other process, watched by a daemon thread."""

    def __init__(self, client, process_index: int, process_count: int, coordinator_host: str):
        self.process_index, self.process_count = process_index, process_count
        self._closing = threading.Event()
        self._lock = threading.Lock()
        if process_index == 0:
            listener = socket.create_server(("", 0), backlog=process_count)
            client.key_value_set(_ADDRESS_KEY, f"{coordinator_host}:{listener.getsockname()[1]}")
            self._peers: dict[socket.socket, int] = {}
            for _ in range(process_count - 1):
                conn, _ = listener.accept()
                peer = int(conn.recv(16).decode())
                self._peers[conn] = peer
            listener.close()
            target = self._watch_peers
        else:
            host, port = client.blocking_key_value_get(_ADDRESS_KEY, _CONNECT_TIMEOUT_MS).rsplit(":", 1)
            self._coordinator = socket.create_connection((host, int(port)))
            self._coordinator.sendall(str(process_index).encode().ljust(16))
            target = self._watch_coordinator
        threading.Thread(target=target, name="g2vlm-peer-watch", daemon=True).start()

    def _watch_peers(self) -> None:
        """Process 0: a connection that closes without `done` is a dead process."""
        open_conns = list(self._peers)
        while open_conns:
            readable, _, _ = select.select(open_conns, [], [])
            for conn in readable:
                data = self._recv(conn)
                open_conns.remove(conn)
                if data != _DONE and not self._closing.is_set():
                    dead = self._peers[conn]
                    for other in open_conns:  # tell the survivors who died, then stop
                        self._send(other, f"{dead}".encode())
                    stop_after_peer_failure(f"process {dead} disconnected")

    def _watch_coordinator(self) -> None:
        """Other processes: process 0 closing without `done`, or naming a dead process, stops this one."""
        data = self._recv(self._coordinator)
        if data == _DONE or self._closing.is_set():
            return
        stop_after_peer_failure(f"process {data.decode()} disconnected" if data else "process 0 disconnected")

    @staticmethod
    def _recv(conn: socket.socket) -> bytes:
        try:
            return conn.recv(16)
        except OSError:
            return b""

    def _send(self, conn: socket.socket, data: bytes) -> None:
        with self._lock:
            try:
                conn.sendall(data)
            except OSError:
                pass  # that peer is gone too; its own watch (or the heartbeat timeout) stops it

    def close(self) -> None:
        """A clean finish: tell the other end(s) this process is done, so its exit is not a death."""
        self._closing.set()
        conns = list(self._peers) if self.process_index == 0 else [self._coordinator]
        for conn in conns:
            self._send(conn, _DONE)


def start() -> PeerWatch | None:
    """Starts the watch after `jax.distributed.initialize` (every process calls it); None for one process.
    Process 0 listens on the coordinator's host, the address every process already reaches."""
    import jax
    from jax._src import distributed as jax_distributed  # the coordination-service client (pinned jax)

    if jax.process_count() == 1:
        return None
    state = jax_distributed.global_state
    return PeerWatch(state.client, jax.process_index(), jax.process_count(),
                     state.coordinator_address.rsplit(":", 1)[0])
