"""A worker that declares one function per case of ``tests/conformance_cases.py``: the
case's trigger, and a rule on its cancel event with the case's ``match`` and ``if_``."""

from __future__ import annotations

import sys

import anyio

from sdk import CancelOn, RunContext, Worker
from sdk.connection import command_client
from tests.apps import serve
from tests.conformance_cases import CASES

REDIS_URL, NAMESPACE = sys.argv[1], sys.argv[2]

worker = Worker("conformance", REDIS_URL, namespace=NAMESPACE, shutdown_timeout=0.2)


async def body(ctx: RunContext) -> None:
    await anyio.sleep(120)


for case in CASES:
    rule = CancelOn(event=case.cancel_name, match=case.match, if_=case.if_, timeout=case.timeout)
    worker.function(id=case.id, trigger=case.trigger_name, cancel_on=[rule])(body)

#: Inngest's singleton ``{key: "event.data.userId", mode: "cancel"}``: a rule on the
#: function's own trigger, matched on the key (docs/migrate/inngest.md).
SINGLETON = "conformance/singleton.requested"
worker.function(
    id="singleton",
    trigger=SINGLETON,
    cancel_on=[CancelOn(event=SINGLETON, match="data.userId")],
)(body)

if __name__ == "__main__":
    serve(worker, command_client(REDIS_URL))
