"""A report worker whose runs stop the moment ``report/cancel.requested`` arrives.

    .venv/bin/python docs/examples/report_worker.py   # finds the Redis of `make run`

Then start a report and cancel it (from Python, the CLI, or a plain XADD):

    .venv/bin/cancel-broker send report/generate.requested '{"reportId": "r1"}'
    .venv/bin/cancel-broker send report/cancel.requested '{"reportId": "r1"}'
"""

from __future__ import annotations

import anyio

from sdk import CancelOn, RunContext, Worker

worker = Worker("reports")  # Redis URL from CANCEL_BROKER_REDIS_URL


async def make_outline(report_id: str) -> list[str]:
    await anyio.sleep(1)  # stands for an LLM call
    return [f"{report_id}: introduction", f"{report_id}: findings", f"{report_id}: summary"]


async def write_section(title: str) -> str:
    await anyio.sleep(2)  # a long awaited call: a cancel interrupts it, not waits for it
    return f"text of {title}"


@worker.function(
    id="generate-report",
    trigger="report/generate.requested",
    cancel_on=[CancelOn(event="report/cancel.requested", match="data.reportId")],
)
async def generate_report(ctx: RunContext) -> dict[str, object]:
    report_id = ctx.event.data["reportId"]
    outline = await ctx.step.run("outline", make_outline, report_id)
    sections = [await ctx.step.run(f"section-{i}", write_section, t) for i, t in enumerate(outline)]
    return {"reportId": report_id, "sections": sections}


if __name__ == "__main__":
    worker.main()
