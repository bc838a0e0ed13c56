"""CooperationContext: propagation rules, typed keys, contextvars."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from scoopy import (
    HAPPY_PATH_DEADLINE,
    ROLLBACK_DEADLINE,
    ContextKey,
    Cooperation,
    CooperationContext,
    Deadline,
    Message,
    PayloadError,
    Saga,
    Scope,
    current_scope,
    deadline,
)

from .helpers import WAIT, both_modes, run_to_end

PARENT = ContextKey("ParentKey", int)
CHILD = ContextKey("ChildKey", int)


class Tenant(msgspec.Struct, frozen=True):
    id: str
    region: str


TENANT = ContextKey("Tenant", Tenant)


class Boom(Exception):
    pass


@both_modes
async def test_propagation_rules_of_the_reference_example(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    """Launch context seeds the first step; a run sees its own changes; children's don't flow up."""
    log: list[tuple[str, dict[str, Any]]] = []

    def note(scope: Scope, label: str) -> None:
        log.append((label, scope.context.to_builtins()))

    root = Saga("root")

    @root.step("0")
    async def root0(scope: Scope, message: Message[Any]) -> None:
        note(scope, "root 0 sees")
        scope.context[PARENT] = 1
        await scope.launch("child", {}, context={CHILD: 0})
        scope.context[PARENT] = 99  # after the launch: the child must not see it
        scope.context[PARENT] = 1

    @root0.rollback
    async def root0_back(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        note(scope, "root rollback 0 sees")
        scope.context[PARENT] = 3

    @root.step("1")
    async def root1(scope: Scope, message: Message[Any]) -> None:
        note(scope, "root 1 sees")
        scope.context[PARENT] = 2
        raise Boom("after changing the context")

    child = Saga("child")

    @child.step("0")
    async def child0(scope: Scope, message: Message[Any]) -> None:
        note(scope, "child 0 sees")
        scope.context[CHILD] = 1

    @child0.rollback
    async def child0_back(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        note(scope, "child rollback 0 sees")
        scope.context[CHILD] = scope.context[CHILD] + 1

    @child.step("1")
    async def child1(scope: Scope, message: Message[Any]) -> None:
        note(scope, "child 1 sees")
        scope.context[CHILD] = 2

    @child1.rollback
    async def child1_back(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        note(scope, "child rollback 1 sees")
        scope.context[CHILD] = 3

    async with make_coop(listen=listen) as coop:
        coop.subscribe("root", root)
        coop.subscribe("child", child)
        outcome = await (await coop.launch("root", {}, context={PARENT: 0})).wait(timeout=WAIT)

    assert outcome.status == "rolled_back"
    assert log == [
        ("root 0 sees", {"ParentKey": 0}),
        ("child 0 sees", {"ChildKey": 0, "ParentKey": 1}),
        ("child 1 sees", {"ChildKey": 1, "ParentKey": 1}),
        ("root 1 sees", {"ParentKey": 1}),
        ("child rollback 1 sees", {"ChildKey": 2, "ParentKey": 2}),
        ("child rollback 0 sees", {"ChildKey": 3, "ParentKey": 2}),
        ("root rollback 0 sees", {"ParentKey": 2}),
    ]


@both_modes
async def test_global_launch_passes_only_the_given_context(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    seen: list[dict[str, Any]] = []
    root = Saga("root")

    @root.step()
    async def start(scope: Scope, message: Message[Any]) -> None:
        scope.context[PARENT] = 5
        await scope.launch_global("independent", {}, context={CHILD: 1})

    other = Saga("independent")

    @other.step()
    async def look(scope: Scope, message: Message[Any]) -> None:
        seen.append(scope.context.to_builtins())

    async with make_coop(listen=listen) as coop:
        coop.subscribe("root", root)
        coop.subscribe("independent", other)
        handle = await coop.launch("root", {})
        assert (await handle.wait(timeout=WAIT)).status == "committed"
        # The global launch is its own hierarchy: find it through the root's EMITTED events.
        runs = await coop.runs(handle.id)
        assert [run.saga for run in runs] == ["root"]
        async with coop.pool.acquire() as conn:
            other_root = await conn.fetchval(
                f'SELECT root_id FROM "{coop.schema}".run WHERE saga = $1', "independent"
            )
        assert (await coop.wait(other_root, timeout=WAIT)).status == "committed"

    assert seen == [{"ChildKey": 1}]


@both_modes
async def test_typed_values_and_contextvars(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    """Helpers deep in user code reach the scope through contextvars, also in subtasks."""
    found: list[Tenant | None] = []

    async def deep_helper() -> Tenant | None:
        return current_scope().context.get(TENANT)

    saga = Saga("tenanted")

    @saga.step()
    async def work(scope: Scope, message: Message[Any]) -> None:
        found.append(await deep_helper())
        found.append(await asyncio.create_task(deep_helper()))

    async with make_coop(listen=listen) as coop:
        coop.subscribe("tenanted", saga)
        handle = await coop.launch("tenanted", {}, context={TENANT: Tenant("acme", "eu")})
        assert (await handle.wait(timeout=WAIT)).status == "committed"

    assert found == [Tenant("acme", "eu"), Tenant("acme", "eu")]
    with pytest.raises(LookupError):
        current_scope()


def test_context_wire_format_keeps_unknown_keys_and_sorts() -> None:
    raw = b'{"zeta":{"x":[1,null,"a\\tb"]},"Tenant":{"id":"acme","region":"eu"},"alpha":null}'
    ctx = CooperationContext.decode(raw)
    assert ctx[TENANT] == Tenant("acme", "eu")
    ctx[PARENT] = 1
    encoded = ctx.encode()
    assert encoded is not None
    assert list(msgspec.json.decode(encoded)) == ["ParentKey", "Tenant", "alpha", "zeta"]
    again = CooperationContext.decode(encoded)
    assert again["zeta"] == {"x": [1, None, "a\tb"]}
    assert again["alpha"] is None
    assert CooperationContext().encode() is None


def test_context_rejects_values_that_are_not_json() -> None:
    ctx = CooperationContext()
    with pytest.raises(PayloadError, match="context value for key 'ParentKey'"):
        ctx[PARENT] = object()
    with pytest.raises(PayloadError, match="does not decode"):
        CooperationContext.decode(b'{"ParentKey": "not an int"}')[PARENT]


def test_a_deadline_cannot_be_loosened_by_name_by_removal_or_by_merging() -> None:
    """Deadlines only tighten, whichever way a value arrives: by the key's bare name, in a
    raw context merged on top, or by deleting the key to set it afresh."""
    strict = deadline(10, "parent")
    ctx = CooperationContext({HAPPY_PATH_DEADLINE: strict})

    ctx["HappyPathDeadline"] = msgspec.to_builtins(deadline(3600, "by name"))
    assert ctx[HAPPY_PATH_DEADLINE].at == strict.at

    raw = CooperationContext.decode(msgspec.json.encode({"HappyPathDeadline": deadline(99, "raw")}))
    assert ctx.merged(raw)[HAPPY_PATH_DEADLINE].at == strict.at
    assert ctx.merged({"HappyPathDeadline": deadline(99, "mapping")})[HAPPY_PATH_DEADLINE].at == (
        strict.at
    )
    # A raw inherited context (as a child decodes it) combines with a later value too.
    inherited = CooperationContext.decode(ctx.encode())
    inherited[HAPPY_PATH_DEADLINE] = deadline(3600, "child")
    assert inherited[HAPPY_PATH_DEADLINE].at == strict.at

    with pytest.raises(PayloadError, match="'HappyPathDeadline' can only be tightened"):
        del ctx[HAPPY_PATH_DEADLINE]
    with pytest.raises(PayloadError, match="can only be tightened"):
        del inherited["HappyPathDeadline"]
    assert ctx[HAPPY_PATH_DEADLINE].at == strict.at
    # A tighter value still wins.
    tighter = deadline(1, "tighter")
    ctx["HappyPathDeadline"] = tighter
    assert ctx[HAPPY_PATH_DEADLINE].at == tighter.at


@both_modes
async def test_a_childs_stricter_rollback_deadline_survives_its_parents_rollback(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    """A parent rolling back hands its context to its committed children; a deadline the
    child had tightened for itself stays the tighter one."""
    parent_limit = deadline(3600, "parent")
    child_limit = deadline(600, "child")
    seen: list[Deadline] = []
    parent = Saga("parent")

    @parent.step()
    async def delegate(scope: Scope, message: Message[Any]) -> None:
        scope.context[ROLLBACK_DEADLINE] = parent_limit
        await scope.launch("child", {})

    @parent.step()
    async def fail(scope: Scope, message: Message[Any]) -> None:
        raise Boom("undo everything")

    child = Saga("child")

    @child.step()
    async def tighten(scope: Scope, message: Message[Any]) -> None:
        scope.context[ROLLBACK_DEADLINE] = child_limit

    @tighten.rollback
    async def undo(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        seen.append(scope.context[ROLLBACK_DEADLINE])

    _, outcome, _ = await run_to_end(
        make_coop(listen=listen), [("parent", parent), ("child", child)], "parent"
    )

    assert outcome.status == "rolled_back"
    assert [(d.at, d.source) for d in seen] == [(child_limit.at, "child")]
