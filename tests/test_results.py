"""Results: what children pass to `scope.set_result` reaches the next step of their parent
through `child_results`, typed by the topic; rolled-back children contribute nothing.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import pytest

from scoopy import Cooperation, CooperationError, Message, PayloadError, Saga, Scope, Topic

from .apps.hierarchies import answering_sagas
from .apps.steps import add_step
from .helpers import WAIT, MakeCoop, both_modes, run_to_end


class QuoteRequest(msgspec.Struct, frozen=True):
    item: str


class Quote(msgspec.Struct, frozen=True):
    carrier: str
    price: int


QUOTES: Topic[QuoteRequest] = Topic("quotes", QuoteRequest, result=Quote)


RUSH: Topic[QuoteRequest] = Topic("rush-quotes", QuoteRequest, result=Quote)


@both_modes
async def test_results_of_several_children_reach_the_next_step(
    make_coop: MakeCoop, listen: bool
) -> None:
    """Fan-out to three sagas: `child_results()` maps each saga to the list of its children's
    results (two for the saga that got two messages); with a typed topic only that topic's
    children count and values decode to its `result` type."""
    seen: dict[str, Any] = {}
    buyer = Saga("buyer")

    @buyer.step()
    async def ask(scope: Scope, message: Message[Any]) -> None:
        await scope.launch(QUOTES, QuoteRequest("book"))
        await scope.launch(RUSH, QuoteRequest("book"))

    @buyer.step()
    async def choose(scope: Scope, message: Message[Any]) -> None:
        seen["raw"] = await scope.child_results()
        seen["typed"] = await scope.child_results(QUOTES)
        seen["rush"] = await scope.child_results(RUSH)
        seen["ups"] = await scope.child_result("ups", QUOTES)
        with pytest.raises(LookupError, match="found 2"):
            await scope.child_result("fedex")
        with pytest.raises(LookupError, match="found 0"):
            await scope.child_result("nobody")
        best = min((q for qs in seen["typed"].values() for q in qs), key=lambda q: q.price)
        scope.set_result(best)

    @buyer.step()
    async def later(scope: Scope, message: Message[Any]) -> None:
        seen["later"] = await scope.child_results()  # the previous step launched nothing

    def carrier(name: str, price: int) -> Saga:
        saga = Saga(name)

        @saga.step()
        async def quote(scope: Scope, message: Message[QuoteRequest]) -> None:
            rush = 100 if message.topic == RUSH.name else 0
            scope.set_result(Quote(name, price + rush))

        return saga

    fedex = carrier("fedex", 30)
    async with make_coop(listen=listen) as coop:
        coop.subscribe("buy", buyer)
        coop.subscribe(QUOTES, carrier("ups", 20))
        coop.subscribe(QUOTES, carrier("dhl", 10))
        coop.subscribe(QUOTES, fedex)
        coop.subscribe(RUSH, fedex)
        handle = await coop.launch("buy", {})
        outcome = await handle.wait(timeout=WAIT)
        result = await db_result(coop, handle.id)

    assert outcome.status == "committed", outcome.failure
    assert {saga: sorted(values, key=str) for saga, values in seen["raw"].items()} == {
        "ups": [{"carrier": "ups", "price": 20}],
        "dhl": [{"carrier": "dhl", "price": 10}],
        "fedex": [{"carrier": "fedex", "price": 130}, {"carrier": "fedex", "price": 30}],
    }
    assert seen["typed"] == {
        "ups": [Quote("ups", 20)],
        "dhl": [Quote("dhl", 10)],
        "fedex": [Quote("fedex", 30)],
    }
    assert seen["rush"] == {"fedex": [Quote("fedex", 130)]}
    assert seen["ups"] == Quote("ups", 20)
    assert seen["later"] == {}
    assert result == {"carrier": "dhl", "price": 10}


async def db_result(coop: Cooperation, root_id: uuid.UUID) -> Any:
    """The stored result of a hierarchy's root run."""
    (run,) = [run for run in await coop.runs(root_id) if run.parent_id is None]
    async with coop.pool.acquire() as conn:
        raw = await conn.fetchval(
            f'SELECT result::text FROM "{coop.schema}".run WHERE id = $1', run.id
        )
    return None if raw is None else msgspec.json.decode(raw)


@both_modes
async def test_a_result_of_the_wrong_type_fails_the_child(
    make_coop: MakeCoop, listen: bool
) -> None:
    """`set_result` validates against the topic's `result` type: a wrong value fails the step."""
    raised: list[type[BaseException]] = []
    sloppy = Saga("sloppy")

    @sloppy.step()
    async def answer(scope: Scope, message: Message[Any]) -> None:
        try:
            scope.set_result({"carrier": "x", "price": "cheap"})
        except PayloadError:
            raised.append(PayloadError)
            raise

    async with make_coop(listen=listen) as coop:
        coop.subscribe(QUOTES, sloppy)
        outcome = await (await coop.launch(QUOTES, QuoteRequest("pen"))).wait(timeout=WAIT)

    assert raised == [PayloadError]
    assert outcome.status == "rolled_back"
    assert outcome.failure is not None and "is not a valid Quote" in outcome.failure.message


@both_modes
async def test_rolled_back_children_contribute_no_result(make_coop: MakeCoop, listen: bool) -> None:
    """A child that set a result and then failed (and rolled back) is absent from
    `child_results`; its committed sibling is there."""
    seen: list[dict[str, list[Any]]] = []
    parent = Saga("results-parent")
    ask = add_step(parent, "ask", launches="answers")

    @ask.on_child_failure
    async def tolerate(scope: Scope, message: Message[Any], failure: CooperationError) -> None:
        assert failure.failure.type == "scoopy.ChildRolledBack"
        seen.append(await scope.child_results())

    add_step(parent, "read")

    steady, flaky = answering_sagas()
    _, outcome, _ = await run_to_end(
        make_coop(listen=listen),
        [("results", parent), ("answers", steady), ("answers", flaky)],
        "results",
    )

    assert outcome.status == "committed", outcome.failure
    assert seen == [{"steady": ["steady answer"]}]


async def test_results_survive_a_handled_child_failure(
    make_coop: MakeCoop,
) -> None:
    """After a handled child failure, the next step still sees the results of the step's
    children that committed."""
    seen: list[dict[str, list[Any]]] = []
    parent = Saga("results-parent")
    ask = add_step(parent, "ask", launches="answers")

    @ask.on_child_failure
    async def tolerate(scope: Scope, message: Message[Any], failure: CooperationError) -> None:
        pass

    @parent.step()
    async def read(scope: Scope, message: Message[Any]) -> None:
        seen.append(await scope.child_results())

    steady, flaky = answering_sagas()
    _, outcome, _ = await run_to_end(
        make_coop(), [("results", parent), ("answers", steady), ("answers", flaky)], "results"
    )

    assert outcome.status == "committed", outcome.failure
    assert seen == [{"steady": ["steady answer"]}]
