"""The claim stays an index walk whatever the planner estimated when it built its plan.

A connection's generic plan for the claim lives until the tables are ANALYZEd. Built while
the tables are small and never analyzed (a fresh deployment), the planner sometimes chose to
sort every ready run for each claim: flat throughput halved once thousands were queued. The
test makes the planner favour that plan on purpose (index page reads priced as very
expensive) and checks the guarded claim walks run_ready_idx anyway.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from scoopy import Cooperation

READY_RUNS = 20_000


async def _claim_plan(coop: Cooperation, dsn: str, plan_by_index: bool) -> str:
    """Plan the claim on a connection while `run` holds 50 ready runs, grow it, EXPLAIN it."""
    store = coop.store
    q = f'"{coop.schema}"'
    fill = f"""
        WITH m AS (
            INSERT INTO {q}.message (id, root_id, topic, payload)
            SELECT id, id, 'grow', '{{}}' FROM (SELECT gen_random_uuid() AS id
                                                  FROM generate_series(1, $1)) g
            RETURNING id
        )
        INSERT INTO {q}.run (id, root_id, message_id, saga, lineage, ready_at)
        SELECT gen_random_uuid(), id, id, 'grown', ARRAY[id], clock_timestamp() FROM m"""
    conn = await asyncpg.connect(dsn, server_settings=coop.server_settings)
    try:
        await conn.execute(fill, 50)
        async with conn.transaction():
            await conn.execute("SET LOCAL random_page_cost = 1000")  # index walks look dear
            if plan_by_index:
                await store.plan_claim(conn)
            await conn.fetchrow(store.sql["claim"], "grown", 17, [], True)  # plans it if not yet
        await conn.execute(fill, READY_RUNS)
        name = await conn.fetchval(
            "SELECT name FROM pg_prepared_statements WHERE statement = $1", store.sql["claim"]
        )
        async with conn.transaction():
            rows = await conn.fetch(f"EXPLAIN EXECUTE {name}('grown', 17, '{{}}', true)")
        await conn.execute(f"DELETE FROM {q}.run WHERE saga = 'grown'")
        await conn.execute(f"DELETE FROM {q}.message WHERE topic = 'grow'")
    finally:
        await conn.close()
    return "\n".join(row[0] for row in rows)


async def test_the_claim_is_planned_as_an_index_walk_whatever_the_table_held(
    make_coop: Callable[..., Cooperation], dsn: str
) -> None:
    async with make_coop(worker=False) as coop:
        unguarded = await _claim_plan(coop, dsn, plan_by_index=False)
        guarded = await _claim_plan(coop, dsn, plan_by_index=True)

    def claim_part(plan: str) -> str:
        return plan.split("CTE Scan on r")[0]  # the locking subquery, before the join

    # The control shows the test can tell the plans apart.
    assert "Sort" in claim_part(unguarded), unguarded
    assert "Sort" not in claim_part(guarded), guarded
    assert "Index Scan using run_ready_idx on run" in claim_part(guarded), guarded
