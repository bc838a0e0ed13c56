"""Issue 11, defect 3 (seed 004, Security): a run cannot forge its position in the hierarchy.

A step's identity (its run, root, lineage) cannot be changed through its `Scope`, and a
scoped launch takes the child's root, parent and lineage from the engine's own state. (They
used to be plain attributes, the lineage the engine's own list, and the store trusted them:
a step could graft a child onto another hierarchy.)
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, cast

import pytest

from scoopy import Cooperation, Message, Saga, Scope

from .helpers import WAIT

MakeCoop = Callable[..., Cooperation]

# How a step might try to move itself: each takes the scope and the victim's root id.
FORGERIES: dict[str, Callable[[Scope, uuid.UUID], None]] = {
    "assign root_id": lambda scope, victim: setattr(scope, "root_id", victim),
    "assign lineage": lambda scope, victim: setattr(scope, "lineage", [victim, scope.run_id]),
    # Through Any: the lineage is a tuple, which has no __setitem__, and that is the point.
    "mutate lineage": lambda scope, victim: cast(Any, scope.lineage).__setitem__(0, victim),
}


def sagas(forge: Callable[[Scope, uuid.UUID], None], attempts: list[str]) -> list[tuple[str, Saga]]:
    victim = Saga("victim")

    @victim.step()
    async def mind_my_business(scope: Scope, message: Message[Any]) -> None:
        pass

    forger = Saga("forger")

    @forger.step()
    async def graft(scope: Scope, message: Message[Any]) -> None:
        try:
            forge(scope, uuid.UUID(message.payload["victim"]))
            attempts.append("accepted")
        except (AttributeError, TypeError) as exc:  # read-only: refused at once
            attempts.append(f"refused: {type(exc).__name__}")
        await scope.launch("graft", {})

    scion = Saga("scion")

    @scion.step()
    async def grow(scope: Scope, message: Message[Any]) -> None:
        pass

    return [("victim", victim), ("forger", forger), ("graft", scion)]


@pytest.mark.parametrize(
    "how",
    [
        "assign root_id",
        "assign lineage",
        "mutate lineage",
    ],
)
async def test_a_step_cannot_graft_a_child_onto_another_hierarchy(
    make_coop: MakeCoop, how: str
) -> None:
    attempts: list[str] = []
    async with make_coop() as coop:
        for topic, saga in sagas(FORGERIES[how], attempts):
            coop.subscribe(topic, saga)
        victim = await coop.launch("victim", {})
        assert (await victim.wait(timeout=WAIT)).status == "committed"
        victim_runs = await coop.runs(victim.id)
        victim_events = await coop.events(victim.id)

        forger = await coop.launch("forger", {"victim": str(victim.id)})
        outcome = await forger.wait(timeout=WAIT)
        forger_runs = await coop.runs(forger.id)

        # The other hierarchy is exactly as it was: no run, no event was added to it.
        assert await coop.runs(victim.id) == victim_runs
        assert await coop.events(victim.id) == victim_events
    assert len(attempts) == 1
    assert outcome.status == "committed", outcome.failure
    # The child belongs to the forger's own hierarchy, under the forger's run.
    [parent] = [run for run in forger_runs if run.saga == "forger"]
    [child] = [run for run in forger_runs if run.saga == "scion"]
    assert child.parent_id == parent.id
    assert child.lineage == [forger.id, parent.id, child.id]


@pytest.mark.parametrize("attribute", ["run_id", "root_id", "lineage", "saga", "step"])
async def test_a_steps_identity_is_read_only(make_coop: MakeCoop, attribute: str) -> None:
    refused: list[bool] = []
    saga = Saga("curious")

    @saga.step()
    async def poke(scope: Scope, message: Message[Any]) -> None:
        try:
            setattr(scope, attribute, getattr(scope, attribute))
            refused.append(False)
        except AttributeError:
            refused.append(True)

    async with make_coop() as coop:
        coop.subscribe("curious", saga)
        outcome = await (await coop.launch("curious", {})).wait(timeout=WAIT)
    assert outcome.status == "committed", outcome.failure
    assert refused == [True]
