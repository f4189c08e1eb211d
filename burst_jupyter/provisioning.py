"""Renting the instance (:class:`Provisioning`): select the offer and fix the cap, launch (the next offer when one
is taken or never boots), wait for it to boot and answer SSH, read back the billed rate; end an attempt that cannot
be used, and after a preemption choose the offers to relaunch on."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from .errors import (
    BudgetKilled,
    ConfigError,
    ConnectFailed,
    HostKeyError,
    NoCapacity,
    Preempted,
    ProviderError,
    ProvisioningFailed,
    RateLimited,
    one_line,
)
from .events import EventType
from .job import check_cap
from .keys import create_job_key
from .lifecycle_state import utc
from .money import format_rate
from .providers.base import BootWatch, Capability, InstanceState, Offer, terminate_confirmed
from .stop_policy import StopPolicy

__all__ = ["Provisioning"]

_MAX_LAUNCH_ATTEMPTS = 4  # offers tried in turn when one is taken or never boots


class _BootFailed(Exception):
    """The instance will never become usable (failed, stopped or vanished while booting): try the next offer."""


class Provisioning(StopPolicy):
    """The steps that rent an instance for the job and make it answer, one attempt at a time."""

    async def _select_offer(self) -> list[Offer]:
        """Search, choose the best, fix the cap. Returns the ranked offers to try in turn."""
        offers, errors = await self.plan.search()
        for name, text in errors.items():
            self.job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: {name} left out of the search: {text}\n")
        if not offers:
            raise self.plan.no_offer(errors)
        self._choose(offers[0])
        self.cap = self.plan.decide_cap(offers[0], self.chosen.teardown_seconds)
        return offers

    def _choose(self, offer: Offer) -> None:
        self.offer, self.rate = offer, offer.price_usd_per_hour
        self.provider = self.plan.providers[offer.provider]
        self.job.emit(EventType.OFFER_SELECTED, provider=offer.provider, gpu=offer.gpu_model,
                      cost_per_hour_usd=self.rate, max_cost_usd=self.cap or None,
                      message=offer.description or None)

    async def _launch(self, offers: list[Offer]) -> None:
        """Rent the best offer; move to the next when one is taken, or never boots and is confirmed gone."""
        job, plan = self.job, self.plan
        why = ""  # what stopped the last offer tried, said in the error if none could be rented
        for i, offer in enumerate(offers[:_MAX_LAUNCH_ATTEMPTS]):
            if i:
                self._choose(offer)
            intent = self._billing_handoff(utc(self.clock.time()))
            if self.recorded:
                await asyncio.to_thread(self.state.record_attempt, job.id, offer.provider, intent)
            else:
                await asyncio.to_thread(self.state.record_intent, job.id, offer.provider, self.owner, intent)
                self.recorded = True
            self._check_cancel()
            provider = self.chosen
            if self.key is None and Capability.RENTED in provider.capabilities and plan.keys_dir is not None:
                self.key = await asyncio.to_thread(create_job_key, plan.keys_dir, job.id,
                                                   comment=f"{plan.tag}/{job.id}")
            job.emit(EventType.PROVISIONING, provider=provider.name, message=offer.description or None)
            self.launched_at = self.clock.time()  # cost counts from the create request, on the wall clock
            self.first_launch = self.first_launch or self.launched_at
            try:
                instance = await provider.launch(offer, plan.spec, job_id=job.id, tag=plan.tag,
                                                 ssh_public_key=self.key.public_line if self.key else None,
                                                 watch=self._boot_watch())
            except NoCapacity as exc:
                # Taken between search and create: nothing was made; the next offer may still be there.
                self.launched_at = None
                if plan.offers is not None:
                    plan.offers.forget(offer)
                why = f"{offer.provider}: {one_line(exc, about=offer.provider)}"
                job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: {why}; trying the next offer\n")
                await asyncio.to_thread(self.state.mark_abandoned, job.id)
                continue
            self.instance = instance
            await asyncio.to_thread(self.state.record_launched, job.id, instance.instance_id,
                                    dataclasses.replace(self._handoff(), **self._instance_handoff()))
            job.emit(EventType.PROVISIONED, provider=provider.name, instance_id=instance.instance_id,
                     gpu=instance.gpu_model, cost_per_hour_usd=instance.price_usd_per_hour, max_cost_usd=self.cap)
            try:
                await self._wait_ready()
                return
            except _BootFailed as exc:
                why = f"{self.chosen.name} instance {instance.instance_id} {exc}"
                self.job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: {why}; ending it\n")
                await self._end_attempt("boot-failed", str(exc))
        tried = min(len(offers), _MAX_LAUNCH_ATTEMPTS)
        raise NoCapacity(f"tried {tried} offer{'s' if tried > 1 else ''}; none could be rented (the last: {why})")

    async def _end_attempt(self, status: str, why: str) -> None:
        """An instance this job can no longer use (never booted, preempted): end it and bill it on a ledger row of
        its own. Only once it is confirmed gone may the job rent elsewhere (never two instances billing at once)."""
        assert self.instance is not None and self.launched_at is not None and self.launched_wall is not None
        instance = self.instance
        problem = await terminate_confirmed(self.chosen, instance.instance_id, timeout=self.terminate_timeout)
        if problem is not None:
            raise ProvisioningFailed(f"{self.chosen.name} instance {instance.instance_id} {why}, and could not "
                                     f"be confirmed gone: {problem}")
        cost = self.meter().attempt_cost()
        self.spent += cost
        await asyncio.to_thread(self.state.mark_terminated, self.job.id)
        if instance.endpoint is not None:
            await asyncio.to_thread(self.connections.reset, instance.endpoint)
        if self.key is not None:
            # The host key pinned for that instance dies with it: a marketplace may hand its ip:port to the next one.
            self.key.known_hosts.unlink(missing_ok=True)
        await asyncio.to_thread(
            self.budget.record_attempt, self.job.id, attempt=self.attempt, provider=self.chosen.name,
            instance_id=instance.instance_id, gpu=instance.gpu_model or "", rate_usd_per_hour=self.rate,
            started_at=self.launched_wall, ended_at=utc(self.clock.time()), actual_usd=cost,
            status=status, name=self.job.spec.name, message=why)
        self.instance, self.launched_at = None, None
        self.attempt += 1

    async def _after_preemption(self, exc: Preempted) -> list[Offer]:
        """The provider took the instance mid-run. End it (a paused bid still bills its disk) and bill the attempt;
        with --retries left, return the offers to relaunch on: the next attempt uploads the rw mounts as they are
        now, i.e. with what the last --sync-every pull (and the sink) received."""
        job, lost = self.job, self.offer
        assert self.instance is not None
        job.emit(EventType.PREEMPTED, provider=self.chosen.name, instance_id=self.instance.instance_id,
                 message=str(exc), cost_so_far_usd=self.cost_so_far())
        await self._end_attempt("preempted", str(exc))
        if lost is not None:
            self.tried.add(f"{lost.provider}:{lost.offer_id}")
        if self.retries_left <= 0:
            raise Preempted(f"{exc}; no --retries left" if self.plan.spec.retries else
                            f"{exc} (--retries N relaunches on the next offer)") from None
        self.retries_left -= 1
        self._reset_attempt()
        offers, errors = await self.plan.search(refresh=True)  # live prices: the market moved since the first search
        # Offers not lost yet come first. A lost one stays last, not out: a RunPod offer is a GPU type, not a
        # machine, and a fresh pod of that type lands elsewhere.
        offers.sort(key=lambda o: f"{o.provider}:{o.offer_id}" in self.tried)
        if not offers:
            raise self.plan.no_offer(errors)
        left = self.cap - self.spent
        try:
            check_cap(left, offers[0].price_usd_per_hour, self.plan.providers[offers[0].provider].teardown_seconds)
        except ConfigError as cap_problem:
            raise BudgetKilled(f"preempted, and what is left of the cap cannot pay for a relaunch: {cap_problem}"
                               ) from None
        job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: relaunching (attempt {self.attempt}, "
                 f"{self.retries_left} retr{'y' if self.retries_left == 1 else 'ies'} left after this)\n")
        self._choose(offers[0])
        return offers

    def _reset_attempt(self) -> None:
        """Forget what the lost attempt's agent said: the relaunch runs the job from the start."""
        self.started, self.stop_reason, self.remote_error, self.setup_error = False, None, None, None
        self.exit_record, self.received = None, None
        self.stop_sent, self.stop_confirmed, self.cancel_by = None, False, None

    async def _wait_ready(self) -> None:
        """Poll the provider until the instance runs, then SSH until it answers: one overall timeout."""
        assert self.instance is not None
        provider, job = self.chosen, self.job
        deadline = self.clock.monotonic() + self.plan.provision_timeout
        delay = min(1.0, provider.poll_seconds)
        last = ""
        while self.instance.state is not InstanceState.RUNNING or self.instance.endpoint is None:
            self._check_cancel()
            self._check_budget()
            if self.clock.monotonic() + delay > deadline:
                raise ProvisioningFailed(f"{provider.name} instance {self.instance.instance_id} did not start within "
                                         f"{self.plan.provision_timeout:.0f} s ({self.instance.detail or 'pending'})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, provider.poll_seconds)
            try:
                current = await provider.get(self.instance.instance_id)
            except (RateLimited, ConnectFailed) as exc:
                # Its own retries are spent, but the instance is booting either way: ask again at the next poll,
                # until the provisioning deadline (a refused key or a 4xx is not waited out).
                job.emit(EventType.PROVISIONING, provider=provider.name, message=f"status unknown for now: {exc}")
                continue
            if current is None:
                raise _BootFailed("vanished while booting")
            if current.state in (InstanceState.FAILED, InstanceState.STOPPED):
                raise _BootFailed(f"failed to boot ({current.detail or current.state.value})")
            self.instance = current
            self._check_billed_rate()
            if current.detail and current.detail != last:
                last = current.detail
                job.emit(EventType.PROVISIONING, provider=provider.name, message=current.detail)
        if self.key is not None:
            assert self.instance.endpoint is not None
            endpoint = dataclasses.replace(self.instance.endpoint, key_path=str(self.key.private_path),
                                           known_hosts=str(self.key.known_hosts), trust_on_first_use=True)
            self.instance = dataclasses.replace(self.instance, endpoint=endpoint)
        await asyncio.to_thread(self.state.update_handoff, job.id, **self._instance_handoff())
        await self._wait_ssh(deadline)

    def _check_billed_rate(self) -> None:
        """The rate actually billed, read back: above --max-price or the cap, the instance is ended at once."""
        assert self.instance is not None
        billed = self.instance.price_usd_per_hour
        if billed == self.rate:
            return
        quoted, self.rate = self.rate, billed
        spec, name = self.plan.spec, self.chosen.name
        if spec.max_price_usd_per_hour is not None and billed > spec.max_price_usd_per_hour:
            ceiling = format_rate(spec.max_price_usd_per_hour)
            raise ProvisioningFailed(f"{name} bills {format_rate(billed)}/h for {self.instance.instance_id} (quoted "
                                     f"{format_rate(quoted)}/h), above --max-price {ceiling}/h; the instance was ended")
        try:
            check_cap(self.cap, billed, self.chosen.teardown_seconds)
        except ConfigError as exc:
            raise ProvisioningFailed(f"{name} bills {format_rate(billed)}/h for {self.instance.instance_id} (quoted "
                                     f"{format_rate(quoted)}/h): {exc}; the instance was ended") from None
        self.job.emit(EventType.OUTPUT, stream="stderr", text=f"burst: {name} bills {format_rate(billed)}/h "
                      f"(quoted {format_rate(quoted)}/h)\n")
        self.job.emit(EventType.PROVISIONED, provider=name, instance_id=self.instance.instance_id,
                      cost_per_hour_usd=billed, max_cost_usd=self.cap)

    async def _wait_ssh(self, deadline: float) -> None:
        """A running instance may take a while to answer SSH (sshd starting, the key being installed)."""
        assert self.instance is not None and self.instance.endpoint is not None
        endpoint, delay = self.instance.endpoint, 0.25
        while True:
            self._check_cancel()
            self._check_budget()
            try:
                await self._within_budget(lambda: self.connections.get(endpoint))
                return
            except HostKeyError:
                raise  # a different host answering is never waited out
            except (ProviderError, OSError, EOFError) as exc:  # refused, not up yet, key not installed yet
                if self.clock.monotonic() + delay > deadline:
                    raise ProvisioningFailed(f"{self.chosen.name} instance {self.instance.instance_id} did not answer "
                                             f"SSH at {endpoint} within {self.plan.provision_timeout:.0f} s: "
                                             f"{one_line(exc)}") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)

    def _boot_watch(self) -> BootWatch:
        """The boot watchdog's terms (providers/_boot_watchdog.py): this job's lease, and when its money or its
        maximum duration runs out, on the wall clock, from this create request."""
        left = self._seconds_left()
        return BootWatch(lease_seconds=self.plan.spec.lease_seconds,
                         end_by=0.0 if left is None else self.clock.time() + max(left, 0.0))

    def _instance_handoff(self) -> dict[str, Any]:
        """The :class:`~burst_jupyter.handoff.Handoff` fields the instance fills in."""
        assert self.instance is not None and self.launched_wall is not None
        return {"instance_id": self.instance.instance_id, "workdir": self.instance.workdir,
                "python": self.instance.python, "endpoint": self.instance.endpoint, "rate": self.rate,
                "gpu": self.instance.gpu_model, "launched_at": self.launched_wall, "attempt": self.attempt}
