"""Which of the four layers against a leaked instance guard one job, said to the user when the job starts: one
line in plain words (:attr:`Protection.summary`), and the layers behind it for whoever asks.

1. the job's own ``finally`` (sync, terminate, verify), 2. the kernel-exit reaper, 3. the agent's dead-man's
switch (the lease, and the job's cost cap and hard maximum duration enforced on the instance too), 4.
reconciliation on the next load or ``burst cleanup``. Layer 3 differs by provider: it ends the instance only where
the provider puts an instance-scoped credential on it (:attr:`~.providers.base.Capability.SELF_DESTRUCT`), and
there it is armed in the create request, so it also ends an instance whose kernel died before any agent ran;
elsewhere it stops the job and an orphaned instance waits for layer 4. Whether a dead kernel's results survive
depends on the result sink: only one the instance can reach (a presigned upload into S3/R2) receives them from the
agent.

Example:
    >>> from burst_jupyter.providers.thunder import ThunderProvider
    >>> guard = protection(ThunderProvider(api_key="k"), None, lease_seconds=600, max_seconds=43200)
    >>> guard.self_destructs, guard.layers[2].startswith("agent lease 600 s stops the job only")
    (False, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .agent import LAPSE_ARCHIVE
from .errors import SyncError
from .providers.base import Capability, self_destruct_of

if TYPE_CHECKING:
    from .providers.base import Provider
    from .sinks import ResultSink

__all__ = ["Protection", "dead_mans_switch", "lapse_upload", "protection"]

#: How long a lapse upload URL outlives the job's maximum duration and lease: the agent's own deadline comes a
#: minute after the client's, and its upload retries take a while.
_UPLOAD_MARGIN_SECONDS = 3600.0


@dataclass(frozen=True)
class Protection:
    layers: tuple[str, ...]
    results: str  # what becomes of the rw results if the kernel dies mid-job
    self_destructs: bool  # the agent ends the instance itself when the client goes silent
    summary: str  # what happens if the notebook dies, in one line a user reads (the view shows the rest on demand)

    def describe(self) -> str:
        return f"{' · '.join(self.layers)}; {self.results}"


def lapse_upload(sink: ResultSink | None, *, max_seconds: float, lease_seconds: int) -> str | None:
    """Where the agent puts a lapsed job's results: a presigned PUT of ``lapse-results.tar`` into the sink, valid
    past the job's maximum duration, its lease and a margin. None without a sink the instance can reach (or when
    the sink cannot sign one; the job runs all the same and :func:`protection` says the results are unprotected).
    """
    if sink is None:
        return None
    try:
        return sink.presigned_put(LAPSE_ARCHIVE,
                                  expires_seconds=max_seconds + lease_seconds + _UPLOAD_MARGIN_SECONDS)
    except SyncError:
        return None


def dead_mans_switch(provider: Provider, sink: ResultSink | None, *, max_seconds: float,
                     lease_seconds: int) -> dict[str, Any]:
    """The manifest entries the agent acts on when the lease lapses: the provider's self-destruct recipe (no
    credential in it) and the upload URL. Nothing secret: the manifest is readable on the instance."""
    recipe = self_destruct_of(provider)
    return {"self_destruct": None if recipe is None else recipe.to_json(),
            "lapse_upload": lapse_upload(sink, max_seconds=max_seconds, lease_seconds=lease_seconds)}


def protection(provider: Provider, sink: ResultSink | None, *, lease_seconds: int, max_seconds: float) -> Protection:
    """The layers guarding a job on ``provider``, and whether its results outlive a dead kernel."""
    self_destructs = self_destruct_of(provider) is not None
    rented = Capability.RENTED in provider.capabilities
    layers = ["job's own finally", "kernel-exit reaper"]
    if not lease_seconds:
        layers.append("no agent lease (--lease 0): a dead kernel's job runs to its maximum duration")
    elif self_destructs:
        # From the create on: the boot watchdog (providers/_boot_watchdog.py) until the agent takes over.
        layers.append(f"agent lease {lease_seconds} s → ends the instance, from its boot on ({provider.name} "
                      "scoped key)")
    elif rented:
        layers.append(f"agent lease {lease_seconds} s stops the job only ({provider.name} has no scoped key): an "
                      "orphan, and an instance whose kernel died while it was created or booting, is ended by "
                      "reconciliation on the next load or burst cleanup")
    else:
        layers.append(f"agent lease {lease_seconds} s stops the job and clears its work folder")
    # The agent holds the cap itself wherever the instance bills (the manifest carries the rate and the cap).
    layers.append(f"{'cost cap and ' if rented else ''}hard max {_span(max_seconds)}, on the instance too")
    if self_destructs or not rented:
        layers.append("reconciliation")
    if lapse_upload(sink, max_seconds=max_seconds, lease_seconds=lease_seconds) is not None:
        assert sink is not None
        results = f"a dead kernel's rw results go to {sink.describe()}/{LAPSE_ARCHIVE}"
    elif self_destructs and lease_seconds:
        results = "a dead kernel's rw results end with the instance (no result sink it can reach: use an s3:// or " \
                  "r2:// --sink)"
    else:
        where = "on the instance" if rented else "in the job's folder"
        results = f"a dead kernel's rw results wait {where} for burst cleanup"
    return Protection(layers=tuple(layers), results=results, self_destructs=self_destructs,
                      summary=_summary(provider, lease_seconds=lease_seconds, max_seconds=max_seconds,
                                       self_destructs=self_destructs))


def _summary(provider: Provider, *, lease_seconds: int, max_seconds: float, self_destructs: bool) -> str:
    if not lease_seconds:
        return f"If this notebook dies, the job runs on to its time limit ({_span(max_seconds)}): --lease 0."
    within = f"within {_span(lease_seconds)}"
    if self_destructs:
        return f"If this notebook dies, the machine shuts itself down {within}."
    if Capability.RENTED in provider.capabilities:
        return (f"If this notebook dies, the job stops {within}; the machine is ended the next time burst loads "
                "(or by burst cleanup).")
    return f"If this notebook dies, the job stops {within}."


def _span(seconds: float) -> str:
    if seconds < 60 or seconds % 60:
        return f"{seconds:g} s"
    return f"{seconds / 3600:g} h" if seconds % 3600 == 0 else f"{seconds / 60:g} min"
