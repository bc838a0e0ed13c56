"""Properties of the run state machine over random sagas: whatever steps, handlers and
compensations do, every run keeps the invariants (simulated runner: tests/machine_sim.py).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from datetime import timedelta
from itertools import pairwise

import pytest

from scoopy.engine.machine import (
    Compensate,
    EventSpec,
    EventType,
    Finish,
    HandleChildren,
    Instance,
    Invoke,
    Phase,
    Wait,
)
from scoopy.failure import CooperationFailure, GaveUp, RollbackFailed
from scoopy.saga import NextStep

from .machine_sim import T0, Child, FakeStep, Outcome, Raises, Returns, Sim, boom


class RandomSim(Sim):
    """A saga whose steps, handlers and compensations behave at random (seeded)."""

    def __init__(self, seed: int, mid_transaction_deadline: bool = False) -> None:
        self.rng = random.Random(seed)
        rng = self.rng
        count = rng.randint(1, 4)
        super().__init__(
            [
                FakeStep(
                    f"s{i}",
                    compensate="undo" if rng.random() < 0.7 else None,
                    handler=rng.random() < 0.5,
                )
                for i in range(count)
            ]
        )
        self.budget = rng.randint(1, 10)  # invocations that may loop back
        self.cancel_at = rng.randint(0, 8) if rng.random() < 0.25 else None
        self.deadline_at = rng.randint(0, 12) if rng.random() < 0.05 else None
        self.cancellation = boom("cancelled", "operator")
        self.deadline = boom("rollback deadline", "deadline")
        if mid_transaction_deadline:
            # A happy-path deadline that can pass after runner.user_code's give-up check.
            self.happy_deadline = T0 + timedelta(seconds=rng.randint(1, 8))
            self.bookkeeping_takes = timedelta(seconds=1)

    def next_step(self, iteration: int) -> NextStep | None:
        rng = self.rng
        if self.budget <= 0:
            return rng.choice([None, NextStep.CONTINUE])
        self.budget -= 1
        choices: list[NextStep | None] = [None, NextStep.CONTINUE]
        if iteration < 2:
            choices.append(NextStep.REPEAT)
        choices.append(NextStep.goto(rng.choice(self.steps).name))
        if rng.random() < 0.03:
            choices.append(NextStep.goto("missing"))
        return rng.choice(choices)

    def children(self, fail: float) -> tuple[Child, ...]:
        rng = self.rng
        return tuple(
            Child(
                boom(f"child {i}", f"child[{i}]") if rng.random() < fail else None,
                boom(f"child {i} rollback") if rng.random() < 0.1 else None,
            )
            for i in range(rng.choice([0, 0, 1, 2]))
        )

    def outcome_of(self, act: Invoke) -> Outcome:
        rng = self.rng
        if rng.random() < 0.12:
            retry = rng.choice([1.0, 5.0]) if act.attempt < 3 and rng.random() < 0.5 else None
            return Raises(boom(f"step {act.step} attempt {act.attempt}"), retry)
        sleep = self.now + timedelta(seconds=30) if rng.random() < 0.1 else None
        return Returns(self.next_step(act.iteration), self.children(0.25), sleep)

    def handler_outcome_of(self, act: HandleChildren) -> Outcome:
        rng = self.rng
        if rng.random() < 0.3:
            return Raises(boom(f"handler {act.step}/{act.handler_iteration}"))
        nxt = self.next_step(self.state.last_iteration) if rng.random() < 0.3 else None
        children = self.children(0.3) if act.handler_iteration < 2 else ()
        return Returns(nxt, children)

    def compensation_outcome_of(self, act: Compensate) -> CooperationFailure | None:
        return boom(f"undo {act.instance.seq}") if self.rng.random() < 0.07 else None

    def children_finish(self) -> bool:
        return self.rng.random() < 0.7

    def before_transaction(self) -> None:
        if len(self.transactions) == self.cancel_at:
            self.give_up_happy = self.cancellation
        if len(self.transactions) == self.deadline_at:
            self.give_up_rollback = self.deadline


def check_invariants(sim: Sim) -> None:
    """Properties every run has, whatever its script."""
    finish = sim.finish
    assert finish is not None
    events = sim.events
    terminal = {
        "committed": EventType.COMMITTED,
        "rolled_back": EventType.ROLLED_BACK,
        "rollback_failed": EventType.ROLLBACK_FAILED,
    }
    assert [e for e in events if e.type in terminal.values()] == [events[-1]]
    assert events[-1].type is terminal[finish.status]
    assert sim.resumes < 20 * len(sim.transactions)  # bounded transitions per transaction

    # At most one piece of user code per transaction; a transaction ends in Wait, Finish or
    # a deferred piece of user code, and only the last one finishes.
    for tx in sim.transactions:
        assert len(tx.user_code) <= 1
        assert isinstance(tx.end, Wait | Finish | Invoke | HandleChildren | Compensate)
    assert all(not isinstance(tx.end, Finish) for tx in sim.transactions[:-1])

    # Instances and sub-steps are numbered in order.
    numbered = [e.instance for e in events if e.type is EventType.SUSPENDED]
    assert all(a is not None and b is not None and a < b for a, b in pairwise(numbered))

    # Iterations count consecutive executions of one step.
    steps_done = [e for e in events if e.type is EventType.SUSPENDED and e.phase is Phase.STEP]
    previous: list[EventSpec | None] = [None, *steps_done]
    for before, e in zip(previous, steps_done, strict=False):
        if before is not None and before.step_index == e.step_index:
            assert before.iteration is not None
            assert e.iteration == before.iteration + 1
        else:
            assert e.iteration == 0
    retried = sum(1 for e in events if e.type is EventType.ATTEMPT_FAILED)
    assert retried == len(sim.raised) - (1 if sim.failing is not None else 0)

    instances = [
        Instance(e.instance or 0, e.step_index or 0, e.iteration or 0, e.handler_iteration)
        for e in events
        if e.type is EventType.SUSPENDED and e.phase in (Phase.STEP, Phase.HANDLER)
    ]
    attempted = sim.compensated

    if finish.status == "committed":
        assert finish == Finish("committed")
        assert EventType.ROLLING_BACK not in [e.type for e in events]
        assert attempted == []
        assert steps_done[-1].step_index == len(sim.steps) - 1
        return

    [start] = [i for i, e in enumerate(events) if e.type is EventType.ROLLING_BACK]
    happy, rollback = events[:start], events[start + 1 : -1]
    assert all(e.phase in (Phase.STEP, Phase.HANDLER, None) for e in happy)
    assert all(e.phase in (Phase.CHILDREN, Phase.COMPENSATION) for e in rollback)
    assert finish.failure == events[start].failure

    # The instance that failed is the newest and never committed, so never compensated.
    if sim.failing is not None:
        assert all(i.seq < sim.failing.seq for i in instances)
        assert sim.failing.seq not in {i.seq for i in attempted}

    # Compensations: committed step instances with a compensation, newest first, each at
    # most once; only a failing compensation or giving up stops them.
    expected = [
        i
        for i in reversed(instances)
        if i.handler is None and sim.steps[i.step].compensate is not None
    ]
    assert attempted == expected[: len(attempted)]
    if sim.compensation_failures:
        assert sim.compensation_failures == [attempted[-1]]
        assert finish.status == "rollback_failed"
    last = events[-1].failure
    gave_up = last is not None and last.type == GaveUp.wire_type
    halted = bool(sim.compensation_failures) or gave_up
    if not halted:
        assert attempted == expected
        # Every instance had its children rolled back, then (a step's) compensation ran.
        plan: list[tuple[Phase, int, int, int | None]] = []
        for i in reversed(instances):
            plan.append((Phase.CHILDREN, i.step, i.iteration, i.handler))
            if i.handler is None:
                plan.append((Phase.COMPENSATION, i.step, i.iteration, None))
        done = [(e.phase, e.step_index, e.iteration, e.handler_iteration) for e in rollback]
        assert done == plan
        assert events[-1].step == f"Rollback of {sim.steps[0].name}"

    if finish.status == "rolled_back":
        assert not sim.compensation_failures
        assert finish.rollback_failure is None
    else:
        assert halted or sim.child_rollback_failures
        failure = finish.rollback_failure
        assert failure is not None
        assert failure.type == RollbackFailed.wire_type
        assert failure.causes[-1] == finish.failure
        if halted:
            assert failure.causes[0] == last


def keep_the_invariants(seeds: Iterable[int], mid_transaction_deadline: bool = False) -> None:
    """Run one random saga per seed and check the invariants of each; a failure names its seed."""
    for seed in seeds:
        sim = RandomSim(seed, mid_transaction_deadline)
        try:
            sim.run(max_transactions=300)
            check_invariants(sim)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: {exc}") from exc


@pytest.mark.parametrize("chunk", range(8))
def test_random_sagas_keep_the_invariants(chunk: int) -> None:
    keep_the_invariants(range(chunk * 50, chunk * 50 + 50))


def test_random_sagas_with_a_deadline_passing_mid_transaction_keep_the_invariants() -> None:
    keep_the_invariants(range(400), mid_transaction_deadline=True)


def test_random_sagas_reach_every_ending() -> None:
    endings = {RandomSim(seed).run(max_transactions=300).status for seed in range(400)}
    assert endings == {"committed", "rolled_back", "rollback_failed"}
