"""A FastAPI report generator with a Cancel button and live status.

The page lists your reports with their status, updated live; **Generate** starts one,
**Cancel** stops it in the middle of its long call. Three processes, as in production:

    make run                       # the broker, on an embedded Redis it advertises
    .venv/bin/pip install -e '.[fastapi]'                     # in another shell
    .venv/bin/python docs/examples/fastapi_reports.py worker          # the worker
    .venv/bin/uvicorn fastapi_reports:app --app-dir docs/examples     # the app

(Given no Redis URL, the worker and the app find the embedded Redis of `make run`; with
a Redis of your own, export ``CANCEL_BROKER_REDIS_URL`` in each shell.)

then open http://127.0.0.1:8000/, sign in as any account name, press Generate, then
Cancel. (``CANCEL_BROKER_NAMESPACE``, read by the SDK as by the broker, selects another
key namespace, for all three.)

- The app sends the trigger with ``Client.send`` and never runs a report itself; the
  worker, wherever it runs, picks it up.
- **Cancel** is the integration's ``cancel_route`` (``POST /runs/{run_id}/cancel``). The
  function declares ``owner="data.accountId"`` and the route passes the signed-in
  account as the actor, so only the account that started a report can cancel it: anyone
  else gets 403, even with the run id in hand.
- The status is polled from ``GET /reports`` every half second: the run's status as the
  SDK recorded it (``running``, ``cancelling``, ``cancelled``, ``completed``).

To keep the example short, the app keeps its list of reports in memory (one uvicorn
process) and the account is a plain cookie: use your real session or token instead, an
unsigned cookie proves nothing.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import structlog
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse

from sdk import Client, RunContext, Worker
from sdk.integrations.starlette import cancel_route

TRIGGER = "report/build.requested"
#: How long writing one report takes: one awaited call standing for an LLM's answer.
WRITING_SECONDS = 30.0

# -- the worker: `python fastapi_reports.py worker` -----------------------------------------

worker = Worker("fastapi-reports")  # Redis and namespace: CANCEL_BROKER_* or `make run`
log = structlog.get_logger("reports")


async def write_report(title: str) -> str:
    await anyio.sleep(WRITING_SECONDS)  # a long awaited call: a cancel interrupts it
    return f"The report on {title}."


@worker.function(id="build-report", trigger=TRIGGER, owner="data.accountId")
async def build_report(ctx: RunContext) -> str:
    report_id = ctx.event.data["reportId"]
    log.info("report.started", report_id=report_id, run_id=ctx.run_id)
    started = time.monotonic()
    try:
        text = await ctx.step.run("write", write_report, ctx.event.data["title"])
    except anyio.get_cancelled_exc_class():
        # Cleanup goes here (a partial file, a reservation); then let the cancel go on.
        elapsed = round(time.monotonic() - started, 2)
        log.info("report.interrupted", report_id=report_id, seconds_into_call=elapsed)
        raise
    log.info("report.written", report_id=report_id)
    return text


# -- the app: `uvicorn fastapi_reports:app` --------------------------------------------------

client = Client()


@dataclass
class Report:
    report_id: str
    account: str
    title: str
    event_id: str  # the trigger: its run is looked up once the worker has registered it
    run_id: str | None = None


reports: dict[str, Report] = {}


def current_account(request: Request) -> str | None:
    """The signed-in account: the owner check's actor. (A real app reads its session.)"""
    return request.cookies.get("account") or None


def signed_in(request: Request) -> str:
    account = current_account(request)
    if account is None:
        raise HTTPException(401, "sign in first")
    return account


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with client:
        yield


app = FastAPI(lifespan=lifespan)
app.router.routes.append(cancel_route(client, actor=current_account))


@app.post("/reports", status_code=201)
async def generate(request: Request) -> dict[str, str]:
    account = signed_in(request)
    report_id = uuid.uuid4().hex[:8]
    title = f"report {len(reports) + 1}"
    event_id = await client.send(
        TRIGGER, {"reportId": report_id, "accountId": account, "title": title}
    )
    reports[report_id] = Report(report_id, account, title, event_id)
    return {"report_id": report_id, "title": title}


@app.get("/reports")
async def list_reports(request: Request) -> list[dict[str, str | None]]:
    account = signed_in(request)
    listed = []
    for report in reports.values():
        if report.account != account:
            continue
        if report.run_id is None:
            runs = await client.runs_for_event(report.event_id)
            report.run_id = runs[0].run_id if runs else None
        info = await client.get_run(report.run_id) if report.run_id else None
        listed.append(
            {
                "report_id": report.report_id,
                "title": report.title,
                "run_id": report.run_id,
                # No run yet: the trigger waits for a worker.
                "status": info.status if info else "queued",
                "reason": info.cancel_reason if info else None,
            }
        )
    return listed


@app.get("/", response_class=HTMLResponse)
async def page() -> str:
    return PAGE


# Inline and dependency-free: no CDN, works offline.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Reports</title>
<style>
 body { font: 15px system-ui, sans-serif; margin: 2rem auto; max-width: 44rem; }
 table { border-collapse: collapse; width: 100%; margin-top: 1rem; }
 td, th { border-bottom: 1px solid #ddd; padding: .4rem; text-align: left; }
 .running { color: #b60; } .cancelled { color: #a00; } .completed { color: #070; }
</style></head>
<body>
<h1>Reports</h1>
<p>Signed in as <input id="account" size="12">
 <button id="signin">Sign in</button> <button id="generate">Generate</button>
 <span id="message"></span></p>
<table><thead><tr><th>Report</th><th>Status</th><th></th></tr></thead>
<tbody id="reports"></tbody></table>
<script>
const $ = (id) => document.getElementById(id);
const account = () => (document.cookie.match(/(?:^|; )account=([^;]*)/) || [])[1] || "";
$("account").value = decodeURIComponent(account());
$("signin").onclick = () => {
  document.cookie = "account=" + encodeURIComponent($("account").value) + "; path=/";
  refresh();
};
$("generate").onclick = async () => {
  const response = await fetch("/reports", {method: "POST"});
  $("message").textContent = response.ok ? "" : "sign in first";
  refresh();
};
async function cancel(runId) {
  const response = await fetch("/runs/" + runId + "/cancel", {
    method: "POST", headers: {"content-type": "application/json"},
    body: JSON.stringify({reason: "cancelled from the page"}),
  });
  const result = await response.json();
  $("message").textContent = "cancel: " + result.outcome;
  refresh();
}
function row(report) {
  const tr = document.createElement("tr");
  const status = report.status + (report.reason ? " (" + report.reason + ")" : "");
  for (const [text, cls] of [[report.title, ""], [status, report.status]]) {
    const td = document.createElement("td");
    td.textContent = text;
    td.className = cls;
    tr.appendChild(td);
  }
  const td = document.createElement("td");
  if (report.run_id && report.status === "running") {
    const button = document.createElement("button");
    button.textContent = "Cancel";
    button.onclick = () => cancel(report.run_id);
    td.appendChild(button);
  }
  tr.appendChild(td);
  return tr;
}
async function refresh() {
  if (!account()) { $("reports").replaceChildren(); return; }
  const response = await fetch("/reports");
  if (response.ok) $("reports").replaceChildren(...(await response.json()).map(row));
}
refresh();
setInterval(refresh, 500);
</script>
</body></html>
"""


if __name__ == "__main__":
    if sys.argv[1:] != ["worker"]:
        sys.exit(f"usage: {sys.argv[0]} worker   (the app: uvicorn fastapi_reports:app)")
    worker.main()
