"""One connection per endpoint, shared by a provider's checks and the job's whole conversation with its agent.

SkyPilot measured one connection per mount as a real cost; here a job's upload, stream, results and teardown all
travel as channels of the same SSH connection.
"""

from __future__ import annotations

import threading
from pathlib import Path

from .providers.base import Endpoint
from .remote import AgentClient
from .runner import LocalRunner, Runner

__all__ = ["Connections"]


class Connections:
    def __init__(self, *, known_hosts: Path | None = None, timeout: float = 20.0) -> None:
        self._known_hosts = known_hosts
        self._timeout = timeout
        self._runners: dict[Endpoint, Runner] = {}
        self._agents: dict[tuple[Endpoint, str], AgentClient] = {}
        self._lock = threading.Lock()
        self._local = LocalRunner()

    def get(self, endpoint: Endpoint) -> Runner:
        """A live runner for ``endpoint``, connecting (blocking) if there is none. Raises ProviderError."""
        if endpoint.is_local:
            return self._local
        with self._lock:
            runner = self._runners.get(endpoint)
            if runner is not None and runner.is_active():  # type: ignore[attr-defined]
                return runner
        from .ssh import SSHRunner  # paramiko only when a job really goes over SSH

        fresh = SSHRunner.connect(endpoint, timeout=self._timeout, known_hosts=self._known_hosts)
        with self._lock:
            old = self._runners.get(endpoint)
            self._runners[endpoint] = fresh
        if old is not None:
            old.close()
        return fresh

    def agent(self, endpoint: Endpoint, python: str, jobdir: str) -> AgentClient:
        """The one client for a job directory: the lifecycle and the provider share it (and its open front)."""
        with self._lock:
            client = self._agents.get((endpoint, jobdir))
            if client is None:
                client = self._agents[(endpoint, jobdir)] = AgentClient(self, endpoint, python, jobdir)
            return client

    def reset(self, endpoint: Endpoint) -> None:
        """Forget a connection that dropped; the next ``get`` reconnects."""
        with self._lock:
            runner = self._runners.pop(endpoint, None)
        if runner is not None:
            runner.close()

    def close_all(self) -> None:
        with self._lock:
            runners, self._runners = list(self._runners.values()), {}
        for runner in runners:
            runner.close()
