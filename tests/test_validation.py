"""Bad input is a clear error naming the problem, raised before anything is written."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import msgspec
import pytest

from scoopy import (
    Cooperation,
    DatabaseUnavailableError,
    InvalidNameError,
    Message,
    PayloadError,
    Saga,
    SagaDefinitionError,
    ScoopyError,
    Scope,
    Topic,
)

from .helpers import WAIT, run_to_end


class Order(msgspec.Struct):
    id: int


def noop_saga(name: str = "noop") -> Saga:
    saga = Saga(name)

    @saga.step()
    async def nothing(scope: Scope, message: Message[Any]) -> None:
        pass

    return saga


async def count_messages(db: asyncpg.Connection[asyncpg.Record]) -> int:
    return int(await db.fetchval("SELECT count(*) FROM message"))


async def test_payload_that_is_not_json_is_refused(
    make_coop: Callable[..., Cooperation], db: asyncpg.Connection[asyncpg.Record]
) -> None:
    async with make_coop() as coop:
        coop.subscribe("orders", noop_saga())
        with pytest.raises(
            PayloadError, match=r"payload for topic 'orders' is not JSON-serialisable"
        ):
            await coop.launch("orders", {"when": object()})
        assert await count_messages(db) == 0


async def test_a_nul_character_is_refused_in_payloads_and_context(
    make_coop: Callable[..., Cooperation], db: asyncpg.Connection[asyncpg.Record]
) -> None:
    """PostgreSQL cannot store NUL in JSON: refused up front, naming where it was."""
    async with make_coop() as coop:
        coop.subscribe("orders", noop_saga())
        with pytest.raises(PayloadError, match=r"payload for topic 'orders' contains a NUL"):
            await coop.launch("orders", {"note": "a\x00b"})
        with pytest.raises(PayloadError, match=r"context value for key 'note' contains a NUL"):
            await coop.launch("orders", {}, context={"note": "\x00"})
        # An escaped backslash followed by "u0000" is ordinary text.
        ok = await (await coop.launch("orders", {"note": "\\u0000"})).wait(timeout=WAIT)
        assert ok.status == "committed"
        assert await count_messages(db) == 1


async def test_typed_topic_refuses_a_payload_that_does_not_validate(
    make_coop: Callable[..., Cooperation], db: asyncpg.Connection[asyncpg.Record]
) -> None:
    orders: Topic[Order] = Topic("orders", Order)
    async with make_coop() as coop:
        coop.subscribe(orders, noop_saga())
        with pytest.raises(PayloadError, match=r"topic 'orders' is not a valid Order.*\$\.id"):
            await coop.launch(orders, {"id": "seven"})
        with pytest.raises(PayloadError, match="not a valid Order"):
            await coop.launch("orders", {"nope": 1})  # the name resolves to the typed topic
        assert await count_messages(db) == 0


async def test_a_launch_inside_a_step_with_a_bad_payload_fails_that_step(
    make_coop: Callable[..., Cooperation], db: asyncpg.Connection[asyncpg.Record]
) -> None:
    saga = Saga("bad-launcher")

    @saga.step()
    async def launch_garbage(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("elsewhere", {"lock": object()})

    _, outcome, _ = await run_to_end(make_coop(), [("start", saga)], "start")

    assert outcome.status == "rolled_back"
    assert outcome.failure is not None
    assert outcome.failure.type == "scoopy.PayloadError"
    assert "'elsewhere'" in outcome.failure.message
    assert await db.fetchval("SELECT count(*) FROM message WHERE topic = 'elsewhere'") == 0


async def test_unreachable_database_is_a_clear_error() -> None:
    coop = Cooperation("postgresql://scoopy:secret@127.0.0.1:1/nowhere", connect_timeout=3)
    with pytest.raises(
        DatabaseUnavailableError, match=r"could not connect to PostgreSQL at"
    ) as info:
        async with coop:
            pass
    assert "secret" not in str(info.value)  # the password is redacted


@pytest.mark.parametrize("name", ["", "has space", "-leading-dash", "a" * 129, "semi;colon", 7])
async def test_invalid_topic_names(make_coop: Callable[..., Cooperation], name: Any) -> None:
    with pytest.raises(InvalidNameError, match="invalid topic name"):
        Topic(name)
    async with make_coop() as coop:
        with pytest.raises(InvalidNameError, match="invalid topic name"):
            await coop.launch(name, {})
        with pytest.raises(InvalidNameError, match="invalid topic name"):
            coop.subscribe(name, noop_saga())


@pytest.mark.parametrize("name", ["", "two words", "x\n", "é"])
def test_invalid_saga_names(name: str) -> None:
    with pytest.raises(InvalidNameError, match="invalid saga name"):
        Saga(name)


def test_invalid_step_names() -> None:
    saga = Saga("steps")
    with pytest.raises(InvalidNameError, match="invalid step name"):

        @saga.step(" padded ")
        async def padded(scope: Scope, message: Message[Any]) -> None:
            pass


async def test_a_saga_without_steps_cannot_be_subscribed(
    make_coop: Callable[..., Cooperation], db: asyncpg.Connection[asyncpg.Record]
) -> None:
    async with make_coop() as coop:
        with pytest.raises(SagaDefinitionError, match="saga 'empty' has no steps"):
            coop.subscribe("topic", Saga("empty"))
        assert ("topic", "empty") not in await coop.subscriptions()


def test_two_steps_with_one_name_are_refused() -> None:
    saga = Saga("dupes")

    @saga.step("same")
    async def first(scope: Scope, message: Message[Any]) -> None:
        pass

    with pytest.raises(SagaDefinitionError, match="saga 'dupes' already has a step named 'same'"):

        @saga.step("same")
        async def second(scope: Scope, message: Message[Any]) -> None:
            pass

    assert [step.name for step in saga.steps] == ["same"]


def test_bad_saga_options_are_refused() -> None:
    with pytest.raises(SagaDefinitionError, match="instances must be >= 1"):
        Saga("zero", instances=0)


async def test_two_sagas_with_one_name_cannot_share_a_cooperation(
    make_coop: Callable[..., Cooperation],
) -> None:
    async with make_coop() as coop:
        coop.subscribe("a", noop_saga("twin"))
        with pytest.raises(SagaDefinitionError, match="another saga named 'twin'"):
            coop.subscribe("b", noop_saga("twin"))


async def test_bad_context_argument(make_coop: Callable[..., Cooperation]) -> None:
    async with make_coop() as coop:
        with pytest.raises(PayloadError, match="context must be a CooperationContext or a mapping"):
            await coop.launch("topic", {}, context=["not", "a", "mapping"])  # type: ignore[arg-type]


def test_invalid_schema_name() -> None:
    with pytest.raises(InvalidNameError, match="invalid schema name"):
        Cooperation("postgresql://x/y", schema='drop"table')


async def test_unknown_hierarchy_is_a_lookup_error(make_coop: Callable[..., Cooperation]) -> None:
    async with make_coop() as coop:
        with pytest.raises(LookupError, match="no message"):
            await coop.handle("00000000-0000-0000-0000-000000000000").wait(timeout=5)


def test_usage_errors_share_a_base_class() -> None:
    for kind in (InvalidNameError, PayloadError, SagaDefinitionError, DatabaseUnavailableError):
        assert issubclass(kind, ScoopyError)
