-- Cancel runs given by id: Client.cancel, Client.cancel_many, and runs the broker matched
-- through a rule's expression. The one place (with match_events.lua) a run leaves 'running'
-- for 'cancelling'; lib.lua is loaded in front of this script.
-- KEYS[1]  runs whose cancel signal is unacknowledged (zset; re-sent until acknowledged)
-- KEYS[2]  cancels by id kept for runs not registered yet (hash: run id -> JSON)
-- KEYS[3]  when each of those stops counting (zset: run id -> ms)
-- ARGV[1 .. 4]  see cancel_context in lib.lua
-- ARGV[5]  id of the cancel event, or '' for a cancel by run id
-- ARGV[6]  reason
-- ARGV[7]  cancelled_by (the event id, or 'api')
-- ARGV[8]  when the cancel was published (ms), or '' for now
-- ARGV[9]  actor: '' (none), '*' (an operator: any run), or the canonical JSON of the
--          caller's value at the function's owner path
-- ARGV[10] the calling worker's id: it cancels the runs it holds itself (no signal), or ''
-- ARGV[11] how long (ms) to keep a cancel by id of a run that does not exist yet, for the
--          run to be cancelled when it registers (register_run.lua); 0 keeps none
-- ARGV[12] most such cancels kept; beyond, the one closest to its end is dropped
-- ARGV[13 ..]  run ids
-- Returns {results, dropped}: one {run id, outcome, previous status, status, {cascaded run
-- ids}, kept until (ms, or '')} per run, and how many kept cancels were dropped for room.
-- A cancel event never cancels the run it triggered, nor a run whose trigger came after it
-- (the user clicked Regenerate after Cancel; or the broker is catching up on a backlog).
-- A run that ended and is continued by another (a Celery retry: 'continued_by') passes the
-- cancel on to the run that continues it.
local c = cancel_context()
local event_id, actor = ARGV[5], ARGV[9]
if ARGV[10] ~= '' then
  c.holder = ARGV[10]
end
local keep, room = tonumber(ARGV[11]), tonumber(ARGV[12])
local request = {
  reason = ARGV[6],
  cancelled_by = ARGV[7],
  event_id = event_id,
  cancel_at = tonumber(ARGV[8]) or c.now,
}
local FIELDS = {'status', 'worker_id', 'event_id', 'trigger_seq', 'owned', 'owner',
  'continued_by'}
local MAX_HOPS = 32

-- The run that carries the cancel: the run itself, or the last run continuing it.
local function carrier(run_id)
  local run = redis.call('HMGET', c.run_prefix .. run_id, unpack(FIELDS))
  for _ = 1, MAX_HOPS do
    local next_id = run[7]
    if not next_id or not TERMINAL[run[1] or ''] or event_id ~= '' then
      break
    end
    run_id = next_id
    run = redis.call('HMGET', c.run_prefix .. run_id, unpack(FIELDS))
  end
  return run_id, run
end

local results, seen, dropped = {}, {}, 0
for i = 13, #ARGV do
  local asked = ARGV[i]
  if not seen[asked] then
    seen[asked] = true
    local run_id, run = carrier(asked)
    local status = run[1]
    local outcome, cascaded, kept_until = nil, {}, ''
    if not status and keep > 0 and event_id == '' then
      -- Not registered yet (a job still queued, an id known before its run started): kept,
      -- and applied by register_run.lua the moment a run registers with this id.
      kept_until = c.now + keep
      redis.call('HSET', KEYS[2], run_id, cjson.encode({reason = request.reason,
        actor = actor, at = c.now, ['until'] = kept_until}))
      redis.call('ZADD', KEYS[3], kept_until, run_id)
      outcome, status = 'pending', ''
    elseif not status then
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
    results[#results + 1] = {asked, outcome, status, after, cascaded,
      kept_until == '' and '' or ms(kept_until)}
  end
end

-- Bounded in memory whoever calls: beyond the room, the kept cancels closest to their end
-- go first (the broker reports the others as they expire).
local excess = keep > 0 and redis.call('ZCARD', KEYS[3]) - room or 0
if excess > 0 then
  for _, run_id in ipairs(redis.call('ZRANGE', KEYS[3], 0, excess - 1)) do
    redis.call('HDEL', KEYS[2], run_id)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, excess - 1)
  dropped = excess
end
return {results, dropped}
