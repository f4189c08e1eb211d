"""What every provider fake shares: machines that are real sshd processes, fault switches, and two ways to serve.

- :class:`FakeMachines` boots a real OpenSSH sshd on loopback per instance, after a boot delay, in a thread, so a
  create call returns at once and the instance becomes reachable later, as on a real cloud. Each machine has its
  own HOME (``ForceCommand``), its own host key and an ``authorized_keys`` the fake fills the provider's own way
  (Vast attaches a key, RunPod reads ``PUBLIC_KEY`` from the env, Thunder takes ``public_key`` at create).
  Vast and RunPod machines also get their id and a random key scoped to them in every session's environment, as
  the real ones inject theirs; the fake API takes that key only to end that one instance (:func:`scoped_key`).
  Destroying a machine stops its sshd, its connections and every process whose HOME is the machine's home (the
  agent, the cell): what a real terminate does to a rented box. A machine created with a ``start`` command runs it
  once it is up, in the instance's environment (HOME, PATH, the injected id and scoped key) as the provider runs
  the create request's start script (Vast ``onstart``, RunPod ``dockerArgs``), so the boot watchdog a test sees
  end an instance is the real one.
- :class:`Switches`: 429 storms, 5xx, a lost reply after the work was done, an offer taken between search and
  create, capacity errors, slow boot, terminate failures. Each fake reads them where its API would misbehave.
- :class:`FakeCloud`: ``handler(request) -> httpx.Response`` serves as an ``httpx.MockTransport`` handler in unit
  tests, and :meth:`FakeCloud.serve` runs the same handler as a loopback HTTP server for end-to-end tests
  (point ``VAST_URL``/``RUNPOD_API_BASE_URL``/``TNR_API_URL`` at ``server.url``).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ for sshd.py, as pytest does

from sshd import SSHServer, kill_connections, start_sshd

__all__ = ["DropReply", "FakeCloud", "FakeMachine", "FakeMachines", "LoopbackServer", "Switches", "billed",
           "json_response", "scoped_key"]


_HOLD = "burst_fake_hold_seconds"  # a response extension: how long the handler holds the reply back


class DropReply(Exception):
    """Raised by a fake handler after it did the work: the client never gets an answer (a lost create reply)."""


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, content=json.dumps(body, default=str).encode(),
                          headers={"content-type": "application/json", **(headers or {})})


@dataclass
class Switches:
    """Faults a test turns on. Counters count down as requests consume them."""

    rate_limit_next: int = 0  # the next N requests (any endpoint) get a 429
    retry_after: float | None = None  # sent with those 429s where the provider sends one
    server_errors_next: int = 0  # the next N requests get a 503
    drop_create_reply: int = 0  # the next N creates are carried out, then the reply is lost
    take_offer_on_create: int = 0  # the next N creates find their offer taken (Vast 410, RunPod capacity error)
    capacity_errors: int = 0  # the next N creates fail for lack of capacity
    terminate_failures: int = 0  # the next N terminates answer 500 and do nothing
    boot_delay: float = 0.0  # seconds from create until the machine answers SSH
    boot_fails: int = 0  # the next N instances never boot: they end up exited/error
    slow_create: float = 0.0  # seconds each create's reply is held after the instance is made (a create in flight)
    latency: float = 0.0  # seconds added to every answer (offer-search benchmarks)
    #: Accept the connection and read the request (recorded), then never answer until the fake closes: a provider
    #: that hangs (issue 10). Behind serve() only: on a MockTransport it would hold the event loop.
    silent: bool = False

    def take(self, name: str) -> bool:
        """Consume one count of a counter switch; True if it fired."""
        value = getattr(self, name)
        if value > 0:
            setattr(self, name, value - 1)
            return True
        return False


class FakeMachine:
    """One rented box: a real sshd that starts after ``boot_delay``, with its own home."""

    def __init__(self, root: Path, *, boot_delay: float, fail: bool = False, gpus: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, start: list[str] | None = None,
                 listen: tuple[str, int] | None = None) -> None:
        self.root = root
        self.listen = listen  # (address, port) for its sshd; None: 127.0.0.1 on a free port
        self.home = root / "home"
        self.gpus = gpus  # what its nvidia-smi reports, one name per GPU
        self.env = dict(env or {})  # what the provider injects into every session (its id, a key scoped to it)
        self.start = start  # the create request's start script, as the provider runs it at container start
        self.started: subprocess.Popen[bytes] | None = None
        self.authorized: list[str] = []
        self.server: SSHServer | None = None
        self.failed = fail
        self.destroyed = False
        self.created_at = time.time()
        self._stack = contextlib.ExitStack()
        self._lock = threading.Lock()
        self._booted = threading.Event()
        if not fail:
            threading.Thread(target=self._boot, args=(boot_delay,), daemon=True, name="fake-boot").start()

    def _boot(self, delay: float) -> None:
        time.sleep(delay)
        with self._lock:
            if self.destroyed:
                return
            bin_dir = self._fake_nvidia_smi()
            where = {"host": self.listen[0], "port": self.listen[1]} if self.listen else {}
            self.server = self._stack.enter_context(start_sshd(self.root / "sshd", home=self.home, path=bin_dir,
                                                               env=self.env, **where))
            self._write_keys()
            if self.start:
                env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(self.home), **self.env}
                self.started = subprocess.Popen(self.start, env=env, cwd=self.home, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._booted.set()

    def _fake_nvidia_smi(self) -> Path:
        """The rented GPUs as the agent sees them: ``nvidia-smi --query-gpu=name --format=csv,noheader``."""
        bin_dir = self.root / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        if self.gpus:
            script = bin_dir / "nvidia-smi"
            script.write_text("#!/bin/sh\n" + "".join(f"echo {shlex.quote(name)}\n" for name in self.gpus))
            script.chmod(0o755)
        return bin_dir

    @property
    def ready(self) -> bool:
        return self._booted.is_set() and not self.destroyed

    def wait_ready(self, timeout: float = 20.0) -> None:
        if not self._booted.wait(timeout):
            raise TimeoutError("fake machine did not boot")

    @property
    def host(self) -> str | None:
        return self.server.host if self.ready and self.server else None

    @property
    def port(self) -> int | None:
        return self.server.port if self.ready and self.server else None

    @property
    def user(self) -> str:
        import getpass

        return getpass.getuser()

    def authorize(self, public_key: str) -> None:
        with self._lock:
            self.authorized.append(public_key.strip())
            self._write_keys()

    def _write_keys(self) -> None:
        # sshd reads the file at every login, so a key attached after boot works from the next connection.
        if self.server is not None:
            own = Path(f"{self.server.client_key_path}.pub").read_text().strip()  # start_sshd's test key
            (self.root / "sshd" / "authorized_keys").write_text("".join(f"{k}\n" for k in [own, *self.authorized]))

    def destroy(self) -> None:
        """What a terminate does: sshd, its sessions and everything started from this home end."""
        with self._lock:
            if self.destroyed:
                return
            self.destroyed = True
            server = self.server
        if server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.pid, signal.SIGSTOP)  # accept nothing more: no session slips in while we clean up
            kill_connections(server)
        _kill_processes_with_home(self.home)
        if server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.pid, signal.SIGKILL)  # a stopped listener never sees a SIGTERM
        if self.started is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.started.wait(5)  # killed with the rest of the machine's processes above
        self._stack.close()

    def processes(self) -> list[int]:
        """Live processes started on this machine (their HOME is its home)."""
        return _pids_with_home(self.home)


def _pids_with_home(home: Path) -> list[int]:
    wanted = f"HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in env:
            found.append(int(entry.name))
    return found


def _kill_processes_with_home(home: Path) -> None:
    for _ in range(3):
        pids = _pids_with_home(home)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


class FakeMachines:
    """The fleet of one fake cloud."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._count = 0
        self._lock = threading.Lock()
        self.all: list[FakeMachine] = []

    def create(self, *, boot_delay: float, fail: bool = False, gpu: tuple[str, str] | None = None,
               count: int = 1, env: dict[str, str] | None = None, start: list[str] | None = None,
               model: str | None = None, listen: tuple[str, int] | None = None) -> FakeMachine:
        """A machine booting after ``boot_delay``; ``gpu`` is (provider, that provider's GPU spelling), or ``model``
        a canonical name; ``env`` is set in its SSH sessions and its ``start`` command; ``listen`` is where its
        sshd listens (default: 127.0.0.1, a free port)."""
        from burst_jupyter.providers.catalog import CATALOG

        canonical = model
        if gpu is not None:
            from burst_jupyter.providers import REGISTRY

            provider, spelling = gpu
            canonical = REGISTRY[provider].gpus.identify(spelling)
        names = (CATALOG[canonical].nvidia_smi[0],) * count if canonical else ()
        with self._lock:
            self._count += 1
            machine = FakeMachine(self.root / f"m{self._count}", boot_delay=boot_delay, fail=fail, gpus=names,
                                  env=env, start=start, listen=listen)
            self.all.append(machine)
        return machine

    def close(self) -> None:
        for machine in self.all:
            machine.destroy()


@dataclass
class Recorded:
    method: str
    path: str
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


class FakeCloud:
    """Base of the three fakes: state behind one lock, the fault switches, a request log, and serving.

    Subclasses implement :meth:`dispatch` (their routes) and :meth:`too_many` (their own 429 body).
    """

    name = "fake"

    def __init__(self, root: Path, *, api_key: str = "test-key") -> None:
        self.api_key = api_key
        self.machines = FakeMachines(root / self.name)
        self.switches = Switches()
        self.requests: list[Recorded] = []
        self.lock = threading.RLock()
        self._closing = threading.Event()  # ends a held reply early when the fake closes

    # -- to override ----------------------------------------------------------------------------------------

    def dispatch(self, request: httpx.Request, body: Any) -> httpx.Response:
        raise NotImplementedError

    def too_many(self) -> httpx.Response:
        return httpx.Response(429, text="Too Many Requests")

    def running(self) -> list[Any]:
        """Instances that are still billing (not destroyed); the end-to-end tests assert this is empty."""
        raise NotImplementedError

    def bills(self) -> dict[str, Decimal]:
        """What each instance ever created has been billed so far (see :func:`billed`), by instance id."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------------------------

    def bearer(self, request: httpx.Request) -> str:
        """The key a request came with (Bearer header or ``?api_key=``)."""
        header = request.headers.get("authorization", "")
        return header.removeprefix("Bearer ") if header.startswith("Bearer ") else request.url.params.get("api_key", "")

    def authorized(self, request: httpx.Request) -> bool:
        header = request.headers.get("authorization", "")
        return header == f"Bearer {self.api_key}" or request.url.params.get("api_key") == self.api_key

    def handler(self, request: httpx.Request) -> httpx.Response:
        body: Any = None
        raw = request.read()
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
        if self.switches.latency:
            time.sleep(self.switches.latency)
        if self.switches.silent:
            with self.lock:
                self.requests.append(Recorded(request.method, request.url.path, body, dict(request.headers)))
            self._closing.wait()
            raise DropReply
        with self.lock:
            self.requests.append(Recorded(request.method, request.url.path, body, dict(request.headers)))
            if self.switches.take("rate_limit_next"):
                return self.too_many()
            if self.switches.take("server_errors_next"):
                return httpx.Response(503, text="Service Unavailable")
            response = self.dispatch(request, body)
        hold = response.extensions.get(_HOLD)
        if hold:
            self._closing.wait(hold)  # outside the lock: the instance's own calls (its watchdog's) go through
        return response

    def created(self, response: httpx.Response) -> httpx.Response:
        """A create's reply, held ``switches.slow_create`` seconds after the instance was made."""
        if self.switches.slow_create:
            response.extensions[_HOLD] = self.switches.slow_create
        return response

    def transport(self) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            try:
                return self.handler(request)
            except DropReply:
                raise httpx.RemoteProtocolError("server closed the connection without a reply",
                                                request=request) from None

        return httpx.MockTransport(handle)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transport())

    @contextlib.contextmanager
    def serve(self) -> Iterator[LoopbackServer]:
        server = LoopbackServer(self)
        try:
            yield server
        finally:
            server.close()

    def close(self) -> None:
        self._closing.set()
        self.machines.close()


class LoopbackServer:
    """The fake's handler behind a real HTTP server on 127.0.0.1 (a thread per request)."""

    def __init__(self, cloud: FakeCloud) -> None:
        handler = _make_handler(cloud)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # shutdown() waits for the loop's next poll: 0.5 s by default, paid three times at the end of every test.
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name=f"fake-{cloud.name}")
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _make_handler(cloud: FakeCloud) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _any(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            content = self.rfile.read(length) if length else b""
            url = f"http://{self.headers.get('host', '127.0.0.1')}{self.path}"
            request = httpx.Request(self.command, url, headers=list(self.headers.items()), content=content)
            try:
                response = cloud.handler(request)
            except DropReply:
                self.close_connection = True
                return
            data = response.read()
            # A reply held back (switches.slow_create) may find its client dead: a kill -9 is what it waits for.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.send_response(response.status_code)
                for key, value in response.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any

    return Handler


def billed(rate: Decimal, created: float, ended: float | None) -> Decimal:
    """The bill of an instance: its billed $/h from the create call to its destroy (or now, while it lives). The
    fault-injection tests hold every bill to the job's --max-cost."""
    seconds = (time.time() if ended is None else ended) - created
    return rate * Decimal(repr(seconds)) / 3600


def scoped_key() -> str:
    """A fresh instance-scoped key (Vast's CONTAINER_API_KEY, RunPod's in-pod RUNPOD_API_KEY): random, so a test
    can tell which key ended an instance."""
    return f"scoped-{secrets.token_hex(16)}"


def money(value: Decimal | float | str) -> float:
    """Providers send prices as JSON numbers."""
    return float(Decimal(str(value)))
