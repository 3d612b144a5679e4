"""The processes of one `lgeo` job and how they stay in step: numbered exchanges in the key-value store of
`jax.distributed`'s coordination service.

Process 0 writes the run directory (manifests, lock, log, every stage's outputs); the others wait for it and
do their share where a stage has one (`Stage.every_process`: the corpus). Every process walks the same
sequence of exchanges: at step n each one posts a short JSON message under `lgeo/<n>/<index>` and reads
everyone's, so an exchange is a barrier that also carries a value (process 0's decision which stages run,
the corpus' committed batches). A process that fails posts its error as its next message instead, which is
exactly the message the others wait for next, so they stop with that error instead of waiting.

Waiting has no fixed limit, since a live peer may train SAEs for hours; a dead peer cannot make it wait for
ever: the coordination service notices its missed heartbeats (`lgeo_jax.cli.HEARTBEAT_S`) and ends every
process of the job (SIGABRT, with jax's message naming the task that stopped). The service's own liveness
query (`get_live_nodes`) is no use here: it is a barrier of the processes asked, so it blocks while a peer
works. A job of one process exchanges nothing.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import jax

log = logging.getLogger("lgeo")

WAIT_SLICE_MS = 60_000  # a wait is logged every 10 minutes


class PeerFailed(RuntimeError):
    """Another process of the job failed or is gone; the message names it and says what it reported."""


class Peers:
    """This process (`index`) among the `count` processes of the job; `client` is jax.distributed's client."""

    def __init__(self, index: int, count: int, client: Any = None):
        if count > 1 and client is None:
            raise ValueError(f"{count} processes need jax.distributed's client to exchange messages")
        self.index, self.count, self.client = index, count, client
        self.step = 0

    @property
    def is_writer(self) -> bool:
        """Process 0: the one process that writes the run directory."""
        return self.index == 0

    def exchange(self, what: str, value: Any = None) -> list[Any]:
        """Posts `value` (JSON) at the next step, named `what`, and returns every process's value in process
        order once all have posted; raises `PeerFailed` if one reports a failure or is gone."""
        if self.count == 1:
            return [value]
        step = self._post({"what": what, "value": value})
        return [self._receive(step, i, what) for i in range(self.count)]

    def fail(self, error: BaseException) -> None:
        """Tells the others this process stopped (posted as its next message; nothing is waited for)."""
        if self.count == 1 or isinstance(error, PeerFailed):  # the others already know, or will from the service
            return
        try:
            self._post({"error": f"{type(error).__name__}: {error}" if str(error) else type(error).__name__})
        except jax.errors.JaxRuntimeError:  # the service is gone too: the others end without the message
            pass

    def _post(self, message: dict) -> int:
        step, self.step = self.step, self.step + 1
        self.client.key_value_set(f"lgeo/{step}/{self.index}", json.dumps(message))
        return step

    def _receive(self, step: int, index: int, what: str) -> Any:
        waited = 0
        while True:
            try:
                text = self.client.blocking_key_value_get(f"lgeo/{step}/{index}", WAIT_SLICE_MS)
                break
            except jax.errors.JaxRuntimeError as e:
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise PeerFailed(f"the job's coordination service failed while process {self.index} waited "
                                     f"for process {index} at '{what}': {e}") from e
            waited += WAIT_SLICE_MS // 1000
            if waited % 600 == 0:
                log.info("process %d: waiting %d s for process %d at '%s'", self.index, waited, index, what)
        message = json.loads(text)
        if "error" in message:
            raise PeerFailed(f"process {index} stopped: {message['error']}")
        if message["what"] != what:
            raise PeerFailed(f"internal: process {index} is at '{message['what']}' where process {self.index} is "
                             f"at '{what}' (step {step})")
        return message["value"]


@functools.cache
def job_peers() -> Peers:
    """The peers of this process's job (one process when `jax.distributed` was not initialised); one object
    per process, so every caller walks the same sequence of exchanges."""
    if jax.process_count() == 1:
        return Peers(0, 1)
    from jax._src import distributed  # the client of jax.distributed; no public accessor in jax 0.10

    return Peers(jax.process_index(), jax.process_count(), distributed.global_state.client)
