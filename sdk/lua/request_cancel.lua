-- Cancel runs given by id: Client.cancel, Client.cancel_many, and runs the broker matched
-- through a rule's expression. The one place (with match_event.lua) a run leaves 'running'
-- for 'cancelling'; lib.lua is loaded in front of this script.
-- KEYS[1]  runs whose cancel signal is unacknowledged (zset; re-sent until acknowledged)
-- ARGV[1 .. 4]  see cancel_context in lib.lua
-- ARGV[5]  id of the cancel event, or '' for a cancel by run id
-- ARGV[6]  reason
-- ARGV[7]  cancelled_by (the event id, or 'api')
-- ARGV[8]  when the cancel was published (ms), or '' for now
-- ARGV[9]  actor: '' (none), '*' (an operator: any run), or the canonical JSON of the
--          caller's value at the function's owner path
-- ARGV[10] the calling worker's id: it cancels the runs it holds itself (no signal), or ''
-- ARGV[11 ..]  run ids
-- Returns one {run id, outcome, previous status, status, {cascaded run ids}} per run.
-- A cancel event never cancels the run it triggered, nor a run whose trigger came after it
-- (the user clicked Regenerate after Cancel; or the broker is catching up on a backlog).
local c = cancel_context()
local event_id, actor = ARGV[5], ARGV[9]
if ARGV[10] ~= '' then
  c.holder = ARGV[10]
end
local request = {
  reason = ARGV[6],
  cancelled_by = ARGV[7],
  event_id = event_id,
  cancel_at = tonumber(ARGV[8]) or c.now,
}
local results, seen = {}, {}
for i = 11, #ARGV do
  local run_id = ARGV[i]
  if not seen[run_id] then
    seen[run_id] = true
    local run = redis.call('HMGET', c.run_prefix .. run_id, 'status', 'worker_id', 'event_id',
      'trigger_seq', 'owned', 'owner')
    local status = run[1]
    local outcome, cascaded = nil, {}
    if not status then
      outcome, status = 'not_found', ''
    elseif event_id ~= '' and run[3] == event_id then
      outcome = 'own_trigger'
    elseif event_id ~= '' and id_after(run[4], event_id) then
      outcome = 'started_after_cancel'
    elseif run[5] == '1' and actor ~= '*' and (actor == '' or actor ~= run[6]) then
      outcome = 'forbidden'
    elseif status == 'running' then
      cascaded = cancel_run(c, run_id, run[2], request)
      outcome = 'signalled'
    else
      outcome = SETTLED[status] or 'already_cancelling'
    end
    local after = outcome == 'signalled' and 'cancelling' or status
    results[#results + 1] = {run_id, outcome, status, after, cascaded}
  end
end
return results
