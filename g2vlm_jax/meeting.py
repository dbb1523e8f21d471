"""Meeting points of the processes of a multi-process run.

Processes reach the same point of a run at different times: process 0 alone builds a synthetic
dataset, and each process compiles every new program itself (a minute for the tiny model on a
loaded CPU, many minutes for the 2B model). A cross-process collective does not wait that long on
CPU: gloo gives up creating its context after 30 s ("Gloo context initialization failed:
DEADLINE_EXCEEDED"). So the processes meet first, at a barrier of the coordination service (the
`jax.distributed` key-value store, no collective, timeout `BARRIER_TIMEOUT_S`):

- `wait(name)`: every process waits until all have called it with the same name;
- `MeetBeforeRunning(jitted, name)`: a jitted function whose every new program (new argument
  shapes) is compiled by each process, then the processes meet, then it runs;
- `gather(name, value)`: every process's JSON value, in process order, on every process (the
  key-value store again: per-sample evaluation results of different lengths);
- `to_host(tree)`: numpy copies of whole (global) arrays on every process.

With one process each is a plain call. A peer that dies while the others wait is caught by the peer
watch (g2vlm_jax/peer_watch.py) long before the timeout.
"""
from __future__ import annotations

import collections
import json
from typing import Any, Callable

import jax
import numpy as np

BARRIER_TIMEOUT_S = 3600  # longer than any compile or dataset build; a dead peer is caught sooner
_calls: collections.Counter = collections.Counter()  # barrier ids must be unique: count each name's uses


def _client_and_id(name: str):
    """The coordination-service client and this use's unique id of `name` (the same on every process)."""
    from jax._src import distributed as jax_distributed  # the coordination-service client (pinned jax)

    _calls[name] += 1
    return jax_distributed.global_state.client, f"g2vlm: {name} #{_calls[name]}"


def wait(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Blocks until every process of the run has called `wait(name)` (the same number of times)."""
    if jax.process_count() == 1:
        return
    client, barrier_id = _client_and_id(name)
    client.wait_at_barrier(barrier_id, int(timeout_s * 1000))


def gather(name: str, value: Any, timeout_s: float = BARRIER_TIMEOUT_S) -> list:
    """[value of process 0, value of process 1, ...] on every process; `value` must be JSON-serialisable."""
    if jax.process_count() == 1:
        return [value]
    client, key = _client_and_id(name)
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(value, default=lambda x: x.item()))  # numpy scalars
    return [json.loads(client.blocking_key_value_get(f"{key}/{i}", int(timeout_s * 1000)))
            for i in range(jax.process_count())]


def to_host(tree: Any) -> Any:
    """numpy copies of the (global) arrays of `tree`, whole on every process (an all-gather when the
    arrays span processes, so every process must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


class MeetBeforeRunning:
    """Calls `jitted(*args)`; in a multi-process run, each new argument signature is first compiled
    (`jitted.lower(*args).compile()`) and the processes meet at a barrier before running it.

    `static_argnums` must name the positions `jitted` treats as static (their values select the
    program; a compiled program is called without them).
    """

    def __init__(self, jitted: Callable, name: str, static_argnums: tuple[int, ...] = ()):
        self.jitted, self.name, self.static_argnums = jitted, name, tuple(static_argnums)
        self._compiled: dict[Any, Any] = {}

    def __call__(self, *args):
        if jax.process_count() == 1:
            return self.jitted(*args)
        dynamic = tuple(a for i, a in enumerate(args) if i not in self.static_argnums)
        leaves, treedef = jax.tree_util.tree_flatten(dynamic)
        key = (tuple(args[i] for i in self.static_argnums), treedef,
               tuple((np.shape(x), str(getattr(x, "dtype", type(x).__name__))) for x in leaves))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self.jitted.lower(*args).compile()
            wait(f"{self.name} program {len(self._compiled)} compiled")
        return compiled(*dynamic)

    def lower(self, *args):
        return self.jitted.lower(*args)
