"""The one error tree of burst-jupyter.

Providers translate httpx/paramiko errors into these at their boundary (``raise ... from exc``); the magic
turns every :class:`BurstError` into one IPython ``UsageError`` line, except :class:`RemoteError`, which shows
the remote traceback. The Python API raises these as they are.
"""

from __future__ import annotations

__all__ = [
    "ApiError",
    "AuthFailed",
    "BudgetExceededError",
    "BudgetKilled",
    "BurstError",
    "ConfigError",
    "ConnectFailed",
    "HostKeyError",
    "JobCancelled",
    "JobInterrupted",
    "NoCapacity",
    "OfferGone",
    "Preempted",
    "ProviderError",
    "ProvisioningFailed",
    "RateLimited",
    "RemoteError",
    "RemoteSetupError",
    "ResultsTooLarge",
    "SyncError",
    "UnsafeResults",
    "VariableError",
    "flat_message",
    "one_line",
]


class BurstError(Exception):
    """Base of every error burst-jupyter raises on purpose. ``str(err)`` is one line a user can act on."""


class ConfigError(BurstError):
    """Bad input: an option, a JobSpec field, a config file entry. Raised before anything is rented."""


class VariableError(ConfigError):
    """A ``--push``/``--pull`` variable is missing or cannot be pickled; the message names it."""


class BudgetExceededError(BurstError):
    """The job's worst case would push today's or this week's spend past its cap. Nothing was rented."""


class ProviderError(BurstError):
    """A provider could not do what was asked."""


class NoCapacity(ProviderError):
    """No offer fits the request (or the one chosen was taken)."""


class ApiError(ProviderError):
    """A provider's API answered with an error status; ``status`` and the raw ``body`` say which."""

    def __init__(self, message: str, *, status: int, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class OfferGone(NoCapacity):
    """The chosen offer was taken between search and create (Vast 404/410, a RunPod capacity error)."""


class RateLimited(ProviderError):
    """The provider kept answering 429 past the retry budget."""


class AuthFailed(ProviderError):
    """Credentials were refused (API key, SSH key)."""


class ConnectFailed(ProviderError):
    """A host could not be reached (DNS, refused, timeout)."""


class HostKeyError(ProviderError):
    """A host key is unknown (and trust-on-first-use is off) or has changed."""


class Preempted(ProviderError):
    """The provider took the instance mid-run: a spot bid outbid or paused, a spot pod reclaimed, a host gone."""


class ProvisioningFailed(ProviderError):
    """An instance was created but never became usable."""


class RemoteSetupError(ProviderError):
    """The remote side cannot run the job (no Python 3, unwritable mount target, missing GPU)."""


class SyncError(BurstError):
    """Files or variables could not be moved between the notebook and the instance."""


class UnsafeResults(SyncError):
    """The instance sent what the client refuses (a result that would land outside its destination, a record
    line past its limit); fetching it again changes nothing."""


class ResultsTooLarge(SyncError):
    """The results passed the ``--max-results`` limit; fetching them again changes nothing. ``received`` holds what
    landed before the limit (a ``sync_back.Received``)."""

    def __init__(self, message: str, received: object = None) -> None:
        super().__init__(message)
        self.received = received


class BudgetKilled(BurstError):
    """The job was stopped at its cost cap; what it wrote until then was synced back."""


class JobCancelled(BurstError):
    """The job was cancelled (Ctrl-C, ``job.cancel()``, kernel shutdown) before it finished."""


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the wait for a job, which was cancelled and cleaned up. A KeyboardInterrupt (code that stops
    on one still stops), shown by IPython as its one line rather than the frames of burst it passed through."""

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


class RemoteError(BurstError):
    """The cell raised on the remote side. Carries the remote traceback as text.

    IPython calls ``_render_traceback_`` instead of printing the local frames (ipyparallel does the same), so
    the notebook shows the remote traceback, as Python would for the cell, and the cell fails.
    """

    def __init__(self, ename: str, evalue: str, traceback: list[str]) -> None:
        super().__init__(f"{ename}: {evalue}" if evalue else ename)
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback

    def _render_traceback_(self) -> list[str]:
        # As Python prints it for the user's cell (its own "Traceback (most recent call last):" first).
        return list(self.traceback) or [str(self)]


def one_line(error: BaseException, *, about: str | None = None) -> str:
    """The first line of an error's message, for job views, ledger rows and reports (its type's name if empty).

    ``about``: the provider the caller names next to the line itself (``vast: not answering: ...``); the
    provider's own ``vast: `` prefix, which every error from its boundary carries, is then left out, said once.
    """
    text = str(error)
    line = text.splitlines()[0] if text else type(error).__name__
    return line.removeprefix(f"{about}: ") if about else line


def flat_message(error: BaseException) -> str:
    """An error's whole message on one line, its whitespace collapsed (its type's name if empty): paramiko's and
    the socket layer's messages can span lines, and each line of them may matter."""
    return " ".join(str(error).split()) or type(error).__name__
