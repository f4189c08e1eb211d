"""The HTTP client every marketplace provider shares: bearer auth, JSON, bounded retries, one error translation.

- 429, 5xx, timeouts and dropped connections are retried with exponential backoff and full jitter, bounded in
  attempts and in total sleep; a ``Retry-After`` header (seconds or an HTTP date) is honoured when sent. Vast
  sends none and answers 429 in plain text (reference/provider-apis.md 1.2); RunPod's REST v2 sends one.
- A search someone waits on (``interactive=True``: the offer book, ``%burst providers``) has short connect and
  read timeouts (:data:`SEARCH_TIMEOUT`), and a provider that does not answer in time, or cannot be reached, is
  not asked again within the search: it is reported as failing (a 429 or 5xx is still retried). Other requests
  keep the provider's own read timeout, with a connect timeout of :data:`CONNECT_SECONDS` at most.
- A request that creates something (``idempotent=False``) is retried only when the server cannot have acted on
  it: a 429, or a connection that never opened. A 5xx or a read timeout after a create may have created the
  instance, and a blind retry would rent a second one; the caller finds the first by its tag instead.
- Every failure leaves as a :class:`~burst_jupyter.errors.ProviderError` naming the provider, never with the key:
  AuthFailed (401/403), RateLimited (429 past the budget), ApiError (any other status, with ``status``), and
  ConnectFailed (no answer). Providers read their own error bodies through ``error_text``.

The ``httpx.AsyncClient`` is injected (tests pass one with a ``MockTransport``) or made on first use. The key
goes only to paths under ``base_url``, which must pass :func:`~.accounts.key_url_problem` (https, or http to a
loopback address); httpx follows no redirects.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx

from ..errors import ApiError, AuthFailed, ConfigError, ConnectFailed, RateLimited
from .accounts import key_source, key_url_problem

__all__ = ["CONNECT_SECONDS", "SEARCH_TIMEOUT", "ApiClient", "RetryPolicy", "default_error_text", "money_from_json"]

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: An API host that takes longer than this to accept a connection is not going to (issue 10: a provider that
#: held every search for 30 s).
CONNECT_SECONDS = 5.0
#: A search is interactive: a few seconds to connect and to answer, or the provider is reported as failing and
#: the others' offers are shown.
SEARCH_TIMEOUT = httpx.Timeout(8.0, connect=3.0)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # tries in all, the first included
    base_seconds: float = 0.5  # the first backoff ceiling; doubles each try
    max_sleep_seconds: float = 8.0  # ceiling of one backoff sleep (a Retry-After may ask for more)
    max_retry_after_seconds: float = 60.0  # a longer Retry-After gives up at once instead of hanging
    budget_seconds: float = 90.0  # total sleeping across the tries of one request


def money_from_json(value: Any) -> Decimal | None:
    """Money from a JSON number (or numeric string) through its shortest repr, never float arithmetic; None when
    absent or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None


def default_error_text(response: httpx.Response) -> str:
    """The human part of an error body: ``msg``/``message``/``detail``/``error`` of a JSON object, else the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict):
        for key in ("msg", "message", "detail", "error", "title"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value[:300]
    return response.text.strip()[:300]


def retry_after(response: httpx.Response) -> float | None:
    """Seconds the server asked us to wait (``Retry-After`` as seconds or as an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


class ApiClient:
    def __init__(
        self,
        provider: str,
        *,
        base_url: str,
        token: str,
        client: httpx.AsyncClient | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        error_text: Callable[[httpx.Response], str] = default_error_text,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        problem = key_url_problem(base_url)
        if problem is not None:  # the last gate before the key is attached: no caller can send it elsewhere
            raise ConfigError(f"{provider}: {problem}, not {base_url!r}")
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._client = client
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json", **(headers or {})}
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, CONNECT_SECONDS))
        self.retry = retry or RetryPolicy()
        self._error_text = error_text
        self._sleep = sleep
        self.calls = 0  # requests sent, retries included (benchmarks and tests read it)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def url(self, path: str) -> str:
        """Always under the checked base URL: a full URL (from an answer, say) is never where the key goes."""
        return f"{self.base_url}/{path.lstrip('/')}"

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        idempotent: bool | None = None,
        ok: Callable[[httpx.Response], bool] | None = None,
        interactive: bool = False,
    ) -> httpx.Response:
        """Send, retrying what is safe to retry; return a 2xx response (or one ``ok`` accepts), else raise.
        ``interactive``: a search someone waits on (see the module's docstring)."""
        safe = method.upper() in ("GET", "HEAD", "PUT", "DELETE") if idempotent is None else idempotent
        policy, slept = self.retry, 0.0
        last_status: int | None = None
        problem = ""
        what = f"{self.provider}: {method.upper()} {path.split('?')[0]}"
        for attempt in range(policy.attempts):
            wait: float | None = None
            last_status = None
            try:
                self.calls += 1
                response = await self.client.request(method, self.url(path), params=params, json=json,
                                                     headers=self._headers,
                                                     timeout=SEARCH_TIMEOUT if interactive else self._timeout)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                problem = f"cannot connect ({type(exc).__name__})"  # never sent: always safe to retry
                if interactive:
                    raise ConnectFailed(f"{what}: {problem}") from exc
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                if not safe:
                    raise ConnectFailed(f"{what}: the connection failed after the request was sent "
                                        f"({type(exc).__name__}); it may have been carried out") from exc
                problem = f"no answer ({type(exc).__name__})"
                if interactive:
                    raise ConnectFailed(f"{what}: {problem}") from exc
            else:
                if 200 <= response.status_code < 300 or (ok is not None and ok(response)):
                    return response
                text = self._error_text(response)
                if response.status_code in (401, 403):
                    raise AuthFailed(f"{self.provider}: the API key was refused (HTTP {response.status_code}: {text}); "
                                     f"set a valid one in {key_source(self.provider, self._token)}")
                if response.status_code not in RETRY_STATUSES or (response.status_code != 429 and not safe):
                    raise ApiError(f"{what}: HTTP {response.status_code}: {text}", status=response.status_code,
                                   body=response.text)
                problem = f"HTTP {response.status_code}: {text}"
                wait = retry_after(response)
                if wait is not None and wait > policy.max_retry_after_seconds:
                    raise self._gave_up(what, response.status_code, f"{problem} (asked to wait {wait:.0f} s)")
                last_status = response.status_code
            if attempt + 1 >= policy.attempts:
                break
            ceiling = min(policy.max_sleep_seconds, policy.base_seconds * 2**attempt)
            delay = wait + random.uniform(0, 0.1 * ceiling) if wait is not None else random.uniform(0, ceiling)
            if slept + delay > policy.budget_seconds:
                break
            slept += delay
            await self._sleep(delay)
        raise self._gave_up(what, last_status, f"{problem}; gave up after {attempt + 1} tries")

    @staticmethod
    def _gave_up(what: str, status: int | None, detail: str) -> Exception:
        if status == 429:
            return RateLimited(f"{what}: rate limited: {detail}")
        if status is None:
            return ConnectFailed(f"{what}: {detail}")
        return ApiError(f"{what}: {detail}", status=status, body="")

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.request(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise ApiError(f"{self.provider}: {method.upper()} {path}: the answer is not JSON: "
                           f"{response.text[:120]!r}", status=response.status_code, body=response.text) from exc
