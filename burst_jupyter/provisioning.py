"""Renting a machine (:class:`Provisioning`): select the offer and fix the cap, launch (the next offer when one is
taken or never boots), wait for it to boot and answer SSH, read back the billed rate; retire a machine that
cannot be used, and after a preemption choose the offers to relaunch on."""

from __future__ import annotations

import asyncio
import dataclasses

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
from .job_run import JobRun
from .keys import create_job_key
from .machine import Machine
from .money import format_rate
from .providers.base import BootWatch, InstanceState, Offer

__all__ = ["Provisioning"]

_MAX_LAUNCH_ATTEMPTS = 4  # offers tried in turn when one is taken or never boots


class _BootFailed(Exception):
    """The instance will never become usable (failed, stopped or vanished while booting): try the next offer."""


class Provisioning:
    """The steps that rent a machine for the job and make it answer, one attempt at a time."""

    def __init__(self, run: JobRun) -> None:
        self.run = run

    async def select_offer(self) -> list[Offer]:
        """Search, choose the best, fix the cap. Returns the ranked offers to try in turn."""
        run, plan = self.run, self.run.plan
        offers, errors = await plan.search()
        for name, text in errors.items():
            run.note(f"{name} left out of the search: {text}")
        if not offers:
            raise plan.no_offer(errors)
        self._choose(offers[0])
        run.cap = plan.decide_cap(offers[0], run.chosen.teardown_seconds)
        return offers

    def _choose(self, offer: Offer) -> None:
        run = self.run
        run.machine = Machine(provider=run.plan.providers[offer.provider], offer=offer, parts=run.parts,
                              row=run.job.id, key=run.key)
        run.job.emit(EventType.OFFER_SELECTED, provider=offer.provider, gpu=offer.gpu_model,
                     cost_per_hour_usd=run.on.rate, max_cost_usd=run.cap or None,
                     message=offer.description or None)

    async def launch(self, offers: list[Offer]) -> None:
        """Rent the best offer; move to the next when one is taken, or never boots and is confirmed gone."""
        run, job, plan = self.run, self.run.job, self.run.plan
        state = run.parts.state
        why = ""  # what stopped the last offer tried, said in the error if none could be rented
        for i, offer in enumerate(offers[:_MAX_LAUNCH_ATTEMPTS]):
            if i:
                self._choose(offer)
            machine = run.on
            intent = run.billing_handoff(run.clock.time())
            if run.recorded:
                await asyncio.to_thread(state.record_attempt, job.id, offer.provider, intent)
            else:
                await asyncio.to_thread(state.record_intent, job.id, offer.provider, run.parts.owner, intent)
                run.recorded = True
            run.check_cancel()
            if run.key is None and machine.rented and plan.keys_dir is not None:
                run.key = machine.key = await asyncio.to_thread(create_job_key, plan.keys_dir, job.id,
                                                                comment=f"{plan.tag}/{job.id}")
            job.emit(EventType.PROVISIONING, provider=machine.name, message=offer.description or None)
            try:
                instance = await machine.launch(plan.spec, tag=plan.tag, at_create=self._at_create)
            except NoCapacity as exc:
                # Taken between search and create: nothing was made; the next offer may still be there.
                if plan.offers is not None:
                    plan.offers.forget(offer)
                why = f"{offer.provider}: {one_line(exc, about=offer.provider)}"
                run.note(f"{why}; trying the next offer")
                await asyncio.to_thread(state.mark_abandoned, job.id)
                continue
            await asyncio.to_thread(state.record_launched, job.id, instance.instance_id,
                                    dataclasses.replace(run.handoff(), **machine.handoff(run.attempt.number)))
            job.emit(EventType.PROVISIONED, provider=machine.name, instance_id=instance.instance_id,
                     gpu=instance.gpu_model, cost_per_hour_usd=instance.price_usd_per_hour, max_cost_usd=run.cap)
            try:
                await self._wait_ready()
                return
            except _BootFailed as exc:
                why = f"{machine.name} instance {instance.instance_id} {exc}"
                run.note(f"{why}; ending it")
                await self.retire("boot-failed", str(exc))
                run.attempt = run.attempt.next()
        tried = min(len(offers), _MAX_LAUNCH_ATTEMPTS)
        raise NoCapacity(f"tried {tried} offer{'s' if tried > 1 else ''}; none could be rented (the last: {why})")

    async def retire(self, status: str, why: str) -> None:
        """A machine this job can no longer use (never booted, preempted): ended and billed on a ledger row of its
        own (machine.py). Only once it is confirmed gone may the job rent elsewhere."""
        run = self.run
        run.spent += await run.on.end(attempt=run.attempt.number, status=status, why=why, name=run.job.spec.name)

    async def after_preemption(self, exc: Preempted) -> list[Offer]:
        """The provider took the instance mid-run. End it (a paused bid still bills its disk) and bill the attempt;
        with --retries left, return the offers to relaunch on: the next attempt uploads the rw mounts as they are
        now, i.e. with what the last --sync-every pull (and the sink) received."""
        run, job, plan = self.run, self.run.job, self.run.plan
        lost = run.on.offer
        job.emit(EventType.PREEMPTED, provider=run.chosen.name, instance_id=run.on.running.instance_id,
                 message=str(exc), cost_so_far_usd=run.cost_so_far())
        await self.retire("preempted", str(exc))
        run.tried.add(f"{lost.provider}:{lost.offer_id}")
        if run.retries_left <= 0:
            raise Preempted(f"{exc}; no --retries left" if plan.spec.retries else
                            f"{exc} (--retries N relaunches on the next offer)") from None
        run.retries_left -= 1
        run.attempt = run.attempt.next()  # the relaunch runs the job from the start
        offers, errors = await plan.search(refresh=True)  # live prices: the market moved since the first search
        # Offers not lost yet come first. A lost one stays last, not out: a RunPod offer is a GPU type, not a
        # machine, and a fresh pod of that type lands elsewhere.
        offers.sort(key=lambda o: f"{o.provider}:{o.offer_id}" in run.tried)
        if not offers:
            raise plan.no_offer(errors)
        left = run.cap - run.spent
        try:
            check_cap(left, offers[0].price_usd_per_hour, plan.providers[offers[0].provider].teardown_seconds)
        except ConfigError as cap_problem:
            raise BudgetKilled(f"preempted, and what is left of the cap cannot pay for a relaunch: {cap_problem}"
                               ) from None
        run.note(f"relaunching (attempt {run.attempt.number}, "
                 f"{run.retries_left} retr{'y' if run.retries_left == 1 else 'ies'} left after this)")
        self._choose(offers[0])
        return offers

    async def _wait_ready(self) -> None:
        """Poll the provider until the instance runs, then SSH until it answers: one overall timeout."""
        run, job, machine = self.run, self.run.job, self.run.on
        provider, timeout = machine.provider, run.plan.provision_timeout
        deadline = run.clock.monotonic() + timeout
        delay = min(1.0, provider.poll_seconds)
        last = ""
        while machine.running.state is not InstanceState.RUNNING or machine.running.endpoint is None:
            run.check_cancel()
            run.check_budget()
            if run.clock.monotonic() + delay > deadline:
                raise ProvisioningFailed(f"{provider.name} instance {machine.running.instance_id} did not start "
                                         f"within {timeout:.0f} s ({machine.running.detail or 'pending'})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, provider.poll_seconds)
            try:
                current = await provider.get(machine.running.instance_id)
            except (RateLimited, ConnectFailed) as exc:
                # Its own retries are spent, but the instance is booting either way: ask again at the next poll,
                # until the provisioning deadline (a refused key or a 4xx is not waited out).
                job.emit(EventType.PROVISIONING, provider=provider.name, message=f"status unknown for now: {exc}")
                continue
            if current is None:
                raise _BootFailed("vanished while booting")
            if current.state in (InstanceState.FAILED, InstanceState.STOPPED):
                raise _BootFailed(f"failed to boot ({current.detail or current.state.value})")
            machine.instance = current
            self._check_billed_rate()
            if current.detail and current.detail != last:
                last = current.detail
                job.emit(EventType.PROVISIONING, provider=provider.name, message=current.detail)
        machine.pin_key()
        await asyncio.to_thread(run.parts.state.update_handoff, job.id, **machine.handoff(run.attempt.number))
        await self._wait_ssh(deadline)

    def _check_billed_rate(self) -> None:
        """The rate actually billed, read back: above --max-price or the cap, the instance is ended at once."""
        run, machine = self.run, self.run.on
        instance = machine.running
        billed = instance.price_usd_per_hour
        if billed == machine.rate:
            return
        quoted, machine.rate = machine.rate, billed
        spec, name = run.plan.spec, machine.name
        if spec.max_price_usd_per_hour is not None and billed > spec.max_price_usd_per_hour:
            ceiling = format_rate(spec.max_price_usd_per_hour)
            raise ProvisioningFailed(f"{name} bills {format_rate(billed)}/h for {instance.instance_id} (quoted "
                                     f"{format_rate(quoted)}/h), above --max-price {ceiling}/h; the instance was ended")
        try:
            check_cap(run.cap, billed, machine.provider.teardown_seconds)
        except ConfigError as exc:
            raise ProvisioningFailed(f"{name} bills {format_rate(billed)}/h for {instance.instance_id} (quoted "
                                     f"{format_rate(quoted)}/h): {exc}; the instance was ended") from None
        run.note(f"{name} bills {format_rate(billed)}/h (quoted {format_rate(quoted)}/h)")
        run.job.emit(EventType.PROVISIONED, provider=name, instance_id=instance.instance_id,
                     cost_per_hour_usd=billed, max_cost_usd=run.cap)

    async def _wait_ssh(self, deadline: float) -> None:
        """A running instance may take a while to answer SSH (sshd starting, the key being installed)."""
        run, machine = self.run, self.run.on
        endpoint, delay = machine.running.endpoint, 0.25
        assert endpoint is not None
        while True:
            run.check_cancel()
            run.check_budget()
            try:
                await run.within_budget(lambda: run.parts.connections.get(endpoint))
                return
            except HostKeyError:
                raise  # a different host answering is never waited out
            except (ProviderError, OSError, EOFError) as exc:  # refused, not up yet, key not installed yet
                if run.clock.monotonic() + delay > deadline:
                    raise ProvisioningFailed(f"{machine.name} instance {machine.running.instance_id} did not answer "
                                             f"SSH at {endpoint} within {run.plan.provision_timeout:.0f} s: "
                                             f"{one_line(exc)}") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)

    def _at_create(self) -> BootWatch:
        """The create request goes out now: the job's duration counts from its first one. Returns the boot
        watchdog's terms (providers/_boot_watchdog.py): this job's lease, and when its money or its maximum
        duration runs out, on the wall clock, from this create request."""
        run = self.run
        run.first_launch = run.first_launch or run.on.launched_at
        left = run.limits().seconds_left()
        return BootWatch(lease_seconds=run.plan.spec.lease_seconds,
                         end_by=0.0 if left is None else run.clock.time() + max(left, 0.0))
