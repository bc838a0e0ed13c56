"""The rule of structured cooperation on the happy path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import msgspec
import pytest

from scoopy import Cooperation, CooperationError, Message, Saga, Scope, Topic, UnhandledTopicError

from .helpers import WAIT, both_modes
from .reading import of_saga, triples


@both_modes
async def test_three_levels_with_fan_out_complete_in_order(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    """The parent's second step starts only after every grandchild committed."""
    seen: list[str] = []
    at_second_step: dict[str, int] = {}

    parent = Saga("parent")

    @parent.step()
    async def first(scope: Scope, message: Message[Any]) -> None:
        seen.append("parent.first")
        await scope.launch("children", {"from": "parent"})

    @parent.step()
    async def second(scope: Scope, message: Message[Any]) -> None:
        seen.append("parent.second")
        # Every grandchild's commit is visible from inside this step's transaction.
        at_second_step["unfinished"] = await scope.connection.fetchval(
            f"""SELECT count(*) FROM "{scope_schema}".run
                WHERE saga LIKE 'grand%' AND status <> 'committed'"""
        )
        at_second_step["committed"] = await scope.connection.fetchval(
            f"""SELECT count(*) FROM "{scope_schema}".run
                WHERE saga LIKE 'grand%' AND status = 'committed'"""
        )

    sagas: list[tuple[str, Saga]] = [("top", parent)]
    for child_name in ("child-a", "child-b"):
        child = Saga(child_name)

        @child.step("launch")
        async def launch(scope: Scope, message: Message[Any]) -> None:
            seen.append(f"{scope.saga}.launch")
            await scope.launch("grandchildren", {"from": scope.saga})

        @child.step("after")
        async def after(scope: Scope, message: Message[Any]) -> None:
            seen.append(f"{scope.saga}.after")

        sagas.append(("children", child))
    for grand_name in ("grand-x", "grand-y"):
        grand = Saga(grand_name)

        @grand.step("work")
        async def work(scope: Scope, message: Message[Any]) -> None:
            seen.append(f"{scope.saga}.work<-{message.payload['from']}")

        sagas.append(("grandchildren", grand))

    async with make_coop(listen=listen) as coop:
        scope_schema = coop.schema
        for topic, saga in sagas:
            coop.subscribe(topic, saga)
        handle = await coop.launch("top", {"order": 1})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "committed", outcome.failure
    assert outcome.failure is None
    assert at_second_step == {"unfinished": 0, "committed": 4}
    # 2 children x 2 grandchild sagas each ran before the parent's second step.
    before_second = seen[: seen.index("parent.second")]
    assert sorted(s for s in before_second if s.startswith("grand")) == sorted(
        f"{g}.work<-{c}" for g in ("grand-x", "grand-y") for c in ("child-a", "child-b")
    )
    assert seen[-1] == "parent.second"
    for child_name in ("child-a", "child-b"):
        assert seen.index(f"{child_name}.launch") < seen.index(f"{child_name}.after")
    # The log agrees: every grandchild committed before the parent's second step ended.
    second_done = next(
        e.seq for e in events if e.saga == "parent" and e.type == "SUSPENDED" and e.step == "second"
    )
    grand_commits = [e.seq for e in events if e.type == "COMMITTED" and e.saga.startswith("grand")]  # type: ignore[union-attr]
    assert len(grand_commits) == 4
    assert max(grand_commits) < second_done


@both_modes
async def test_event_sequence_matches_the_reference(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    """Seed 003's first table: root-handler launches to child-handler; same types, same order."""
    root = Saga("root-handler")

    @root.step("0")
    async def root0(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("child-topic", {})

    @root.step("1")
    async def root1(scope: Scope, message: Message[Any]) -> None:
        pass

    child = Saga("child-handler")

    @child.step("0")
    async def child0(scope: Scope, message: Message[Any]) -> None:
        pass

    @child.step("1")
    async def child1(scope: Scope, message: Message[Any]) -> None:
        pass

    async with make_coop(listen=listen) as coop:
        coop.subscribe("root-topic", root)
        coop.subscribe("child-topic", child)
        handle = await coop.launch("root-topic", {})
        assert (await handle.wait(timeout=WAIT)).status == "committed"
        events = await coop.events(handle.id)

    assert triples(events) == [
        ("EMITTED", None, None),
        ("SEEN", "root-handler", None),
        ("EMITTED", "root-handler", "0"),
        ("SUSPENDED", "root-handler", "0"),
        ("SEEN", "child-handler", None),
        ("SUSPENDED", "child-handler", "0"),
        ("SUSPENDED", "child-handler", "1"),
        ("COMMITTED", "child-handler", "1"),
        ("SUSPENDED", "root-handler", "1"),
        ("COMMITTED", "root-handler", "1"),
    ]
    root_msg = events[0].message_id
    child_msg = events[2].message_id
    assert [e.message_id for e in events] == [
        root_msg, root_msg, child_msg, root_msg, child_msg, child_msg, child_msg, child_msg,
        root_msg, root_msg,
    ]  # fmt: skip
    # Lineage: root id, then one id per run from the root run down.
    root_run = events[1].run_id
    child_run = events[4].run_id
    assert events[0].lineage == [handle.id]
    assert events[1].lineage == [handle.id, root_run]
    assert events[2].lineage == [handle.id, root_run]  # an emission carries the emitter's lineage
    assert events[4].lineage == [handle.id, root_run, child_run]
    assert all(e.worker for e in events)


@both_modes
async def test_messages_nobody_listens_to_do_not_block(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    saga = Saga("lonely")
    ran: list[str] = []

    @saga.step()
    async def shout(scope: Scope, message: Message[Any]) -> None:
        ran.append("shout")
        await scope.launch("nobody-listens", {"hello": True})

    @saga.step()
    async def go_on(scope: Scope, message: Message[Any]) -> None:
        ran.append("go_on")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("start", saga)
        outcome = await (await coop.launch("start", {})).wait(timeout=WAIT)
        with pytest.raises(UnhandledTopicError, match="nobody-listens-either"):
            await coop.launch("nobody-listens-either", {})  # from outside: it would never run
        nobody = await coop.launch("nobody-listens-either", {}, allow_unhandled=True)
        nobody_outcome = await nobody.wait(timeout=WAIT)

    assert outcome.status == "committed"
    assert ran == ["shout", "go_on"]
    assert nobody_outcome.status == "unhandled" and nobody_outcome.runs == ()
    with pytest.raises(CooperationError, match="nothing ran"):
        nobody_outcome.raise_for_failure()


@both_modes
async def test_one_saga_on_several_topics_and_several_sagas_on_one(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    calls: list[tuple[str, str]] = []

    def recorder(name: str) -> Saga:
        saga = Saga(name)

        @saga.step()
        async def record(scope: Scope, message: Message[Any]) -> None:
            calls.append((scope.saga, message.topic))

        return saga

    audit, mailer, billing = recorder("audit"), recorder("mailer"), recorder("billing")
    async with make_coop(listen=listen) as coop:
        coop.subscribe("user.created", audit)
        coop.subscribe("order.placed", audit)
        coop.subscribe("user.created", mailer)
        coop.subscribe("order.placed", billing)
        first = await coop.launch("user.created", {"id": 1})
        second = await coop.launch("order.placed", {"id": 2})
        outcomes = [await first.wait(timeout=WAIT), await second.wait(timeout=WAIT)]

    assert [o.status for o in outcomes] == ["committed", "committed"]
    assert sorted(run.saga for run in outcomes[0].runs) == ["audit", "mailer"]
    assert sorted(run.saga for run in outcomes[1].runs) == ["audit", "billing"]
    assert sorted(calls) == sorted(
        [
            ("audit", "user.created"),
            ("mailer", "user.created"),
            ("audit", "order.placed"),
            ("billing", "order.placed"),
        ]
    )


class Order(msgspec.Struct):
    id: int
    items: list[str]


@both_modes
async def test_typed_topics_decode_for_the_step(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    orders: Topic[Order] = Topic("orders", Order)
    received: list[Order] = []
    saga = Saga("typed")

    @saga.step()
    async def take(scope: Scope, message: Message[Order]) -> None:
        received.append(message.payload)

    async with make_coop(listen=listen) as coop:
        coop.subscribe(orders, saga)
        one = await coop.launch(orders, Order(1, ["a"]))
        two = await coop.launch("orders", {"id": 2, "items": ["b", "c"]})  # validated by name too
        for handle in (one, two):
            assert (await handle.wait(timeout=WAIT)).status == "committed"

    assert sorted(received, key=lambda o: o.id) == [Order(1, ["a"]), Order(2, ["b", "c"])]
    assert all(isinstance(order, Order) for order in received)


@both_modes
async def test_launch_joins_the_callers_transaction(
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
    listen: bool,
) -> None:
    """With `connection=`, a launch commits or vanishes with the caller's transaction."""
    ran: list[int] = []
    saga = Saga("outbox")

    @saga.step()
    async def handle_it(scope: Scope, message: Message[Any]) -> None:
        ran.append(message.payload["n"])

    await db.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    async with make_coop(listen=listen) as coop:
        coop.subscribe("outbox", saga)
        tx = db.transaction()
        await tx.start()
        await db.execute("INSERT INTO orders VALUES (1)")
        lost = await coop.launch("outbox", {"n": 1}, connection=db)
        await tx.rollback()
        async with db.transaction():
            await db.execute("INSERT INTO orders VALUES (2)")
            kept = await coop.launch("outbox", {"n": 2}, connection=db)
        assert (await kept.wait(timeout=WAIT)).status == "committed"
        assert not await db.fetchval("SELECT EXISTS (SELECT 1 FROM message WHERE id = $1)", lost.id)

    assert ran == [2]
    assert await db.fetchval("SELECT array_agg(id) FROM orders") == [2]


@both_modes
async def test_steps_that_emit_nothing_still_suspend_then_commit(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    saga = Saga("one-step")

    @saga.step()
    async def only(scope: Scope, message: Message[Any]) -> None:
        pass

    async with make_coop(listen=listen) as coop:
        coop.subscribe("one", saga)
        handle = await coop.launch("one", {})
        assert (await handle.wait(timeout=WAIT)).status == "committed"
        events = await coop.events(handle.id)

    assert triples(events) == [
        ("EMITTED", None, None),
        ("SEEN", "one-step", None),
        ("SUSPENDED", "one-step", "only"),
        ("COMMITTED", "one-step", "only"),
    ]
    assert of_saga(events, "one-step")[-1] == ("COMMITTED", "only")


@both_modes
async def test_ancestors_with_nothing_left_commit_in_the_leafs_transaction(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    """A chain whose every saga ends by launching: the leaf's commit finishes them all."""
    sagas = []
    for level in range(3):
        saga = Saga(f"level-{level}")

        @saga.step("launch")
        async def launch(scope: Scope, message: Message[Any], level: int = level) -> None:
            if level < 2:
                await scope.launch(f"level-{level + 1}", {})

        sagas.append((f"level-{level}", saga))

    async with make_coop(listen=listen) as coop:
        for topic, saga in sagas:
            coop.subscribe(topic, saga)
        handle = await coop.launch("level-0", {})
        assert (await handle.wait(timeout=WAIT)).status == "committed"
        events = await coop.events(handle.id)

    commits = [e for e in events if e.type == "COMMITTED"]
    # Children first, then each parent: written one after the other by the leaf's worker,
    # in the leaf's transaction (nothing else ran in between).
    assert [e.saga for e in commits] == ["level-2", "level-1", "level-0"]
    assert [e.seq for e in commits] == [commits[0].seq, commits[0].seq + 1, commits[0].seq + 2]
    assert len({e.worker for e in commits}) == 1
