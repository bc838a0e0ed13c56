"""A child saga served by a worker process the liveness tests kill and bring back.

Started as `python -m scoopy worker tests.apps.liveness:setup --heartbeat 0.2 ...`.
"""

from __future__ import annotations

from typing import Any

from scoopy import Cooperation, Message, Saga, Scope

child = Saga("far-child")


@child.step()
async def answer(scope: Scope, message: Message[Any]) -> None:
    scope.set_result({"answered": True})


def setup(coop: Cooperation) -> None:
    coop.subscribe("far-child", child)
