"""Renting a machine (:class:`Provisioning`): select the offer and fix the cap, launch, wait for it to boot and
answer SSH, read back the billed rate; retire a machine that cannot be used, and after a preemption choose the
offers to relaunch on.

Moving on is decided here, never in a provider: an offer taken since the search (a capacity error) or a machine
that never boots sends the job to the best fitting offer not tried yet, from a search past the offer cache (stock
moves), on whichever provider or tier it is, until the provisioning deadline (``--provision-timeout``) covers
every try. A machine that bills another rate than its offer quoted is ended at once, whatever ``--max-price``
says, and the offer is not offered again in the session."""

from __future__ import annotations

import asyncio
import dataclasses
from decimal import Decimal

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

_MAX_LAUNCH_ATTEMPTS = 10  # offers tried in turn, within the deadline, when one is taken or never boots
#: A billed rate this close to the quote, per GPU, is the same price rounded (a per-GPU price in cents times the
#: count, a float sum of parts); past it the provider bills something else than it quoted (issue 13).
_ROUNDING_PER_GPU = Decimal("0.005")


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
        """Rent the chosen offer (``offers[0]``); move on when it is taken, or never boots and is confirmed gone, to
        the best fitting offer not tried yet (:meth:`_move_on`). One deadline covers every try and each boot."""
        run, job, plan = self.run, self.run.job, self.run.plan
        state = run.parts.state
        deadline = run.clock.monotonic() + plan.provision_timeout
        passed: list[str] = []  # the offers tried and passed, by --offer word
        offer = offers[0]
        while True:
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
                # Taken between search and create: nothing was made, nothing bills.
                await asyncio.to_thread(state.mark_abandoned, job.id)
                offer = await self._move_on(offer, f"{offer.ref} has no capacity now "
                                                   f"({one_line(exc, about=offer.provider)})", passed, deadline)
                continue
            await asyncio.to_thread(state.record_launched, job.id, instance.instance_id,
                                    dataclasses.replace(run.handoff(), **machine.handoff(run.attempt.number)))
            job.emit(EventType.PROVISIONED, provider=machine.name, instance_id=instance.instance_id,
                     gpu=instance.gpu_model, cost_per_hour_usd=instance.price_usd_per_hour, max_cost_usd=run.cap)
            try:
                self._check_billed_rate()  # the create's own answer may carry it (RunPod's costPerHr)
                await self._wait_ready(deadline)
                return
            except _BootFailed as exc:
                why = f"{machine.name} instance {instance.instance_id} {exc}"
                run.note(f"{why}; ending it")
                await self.retire("boot-failed", str(exc))
                run.attempt = run.attempt.next()
                offer = await self._move_on(offer, f"{offer.ref}: {why}", passed, deadline)

    async def _move_on(self, gone: Offer, why: str, passed: list[str], deadline: float) -> Offer:
        """After ``gone`` failed (``why``): search again past the offer cache (the stock that failed may be gone
        everywhere, or back) and choose the best fitting offer not tried yet that what is left of the cap can start
        and stop, on any provider or tier; say what was tried and why the job moves on. Raises NoCapacity, naming
        every offer tried, when none is left, the tries are used up or the provisioning deadline is past."""
        run, plan = self.run, self.run.plan
        passed.append(gone.ref)
        earlier = f" ({', '.join(passed[:-1])}, then {passed[-1]})" if len(passed) > 1 else ""
        tried = f"tried {len(passed)} offer{'s' if len(passed) > 1 else ''}{earlier}"
        if run.clock.monotonic() >= deadline:
            raise NoCapacity(f"{tried}; none could be rented within --provision-timeout "
                             f"{plan.provision_timeout:.0f} s (the last: {why})")
        if len(passed) >= _MAX_LAUNCH_ATTEMPTS:
            raise NoCapacity(f"{tried}; none could be rented, and {_MAX_LAUNCH_ATTEMPTS} is as many as one job tries "
                             f"(the last: {why})")
        offers, errors = await plan.search(refresh=True)
        left = run.cap - run.spent
        fitting = [o for o in offers if o.ref not in passed
                   and _affordable(left, o, plan.providers[o.provider].teardown_seconds)]
        fitting.sort(key=lambda o: f"{o.provider}:{o.offer_id}" in run.tried)  # one lost to a preemption: last
        if not fitting:
            elsewhere = "".join(f"; {name}: {text}" for name, text in errors.items())
            raise NoCapacity(f"{tried}; none could be rented (the last: {why}){elsewhere}")
        chosen = fitting[0]
        run.note(f"{why}; moving on to {chosen.ref} at {format_rate(chosen.price_usd_per_hour)}/h")
        self._choose(chosen)
        return chosen

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

    async def _wait_ready(self, deadline: float) -> None:
        """Poll the provider until the instance runs, then SSH until it answers, by the provisioning deadline."""
        run, job, machine = self.run, self.run.job, self.run.on
        provider, timeout = machine.provider, run.plan.provision_timeout
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
        """The rate actually billed, read back. Not the quote (past rounding): the instance is ended at once,
        whatever --max-price says, billed at that rate, and the offer is not offered again in this session. Above
        --max-price or the cap: ended at once too."""
        run, machine = self.run, self.run.on
        instance, offer = machine.running, machine.offer
        billed = instance.price_usd_per_hour
        if billed <= 0 or billed == machine.rate:  # 0: this record does not say (a provider's unknown rate)
            return
        quoted, machine.rate = offer.price_usd_per_hour, billed  # the ledger row bills what the provider bills
        spec, name = run.plan.spec, machine.name
        figures = (f"{name} instance {instance.instance_id} bills {format_rate(billed)}/h; {offer.ref} quoted "
                   f"{format_rate(quoted)}/h")
        if abs(billed - quoted) > _ROUNDING_PER_GPU * max(offer.gpus, 1):
            if run.plan.offers is not None:
                run.plan.offers.misquote(offer, f"quoted {format_rate(quoted)}/h, billed {format_rate(billed)}/h")
            raise ProvisioningFailed(f"{figures}: the instance was ended at once, and this offer is not offered "
                                     f"again in this session")
        if spec.max_price_usd_per_hour is not None and billed > spec.max_price_usd_per_hour:
            ceiling = format_rate(spec.max_price_usd_per_hour)
            raise ProvisioningFailed(f"{figures}, above --max-price {ceiling}/h; the instance was ended")
        try:
            check_cap(run.cap, billed, machine.provider.teardown_seconds)
        except ConfigError as exc:
            raise ProvisioningFailed(f"{figures}: {exc}; the instance was ended") from None
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


def _affordable(left: Decimal, offer: Offer, teardown_seconds: float) -> bool:
    """Whether what is left of the cap can start and stop a job on ``offer`` (:func:`check_cap`)."""
    try:
        check_cap(left, offer.price_usd_per_hour, teardown_seconds)
    except ConfigError:
        return False
    return True
