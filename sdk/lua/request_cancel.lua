-- Ask the workers holding the given runs to stop them: the one place a run leaves 'running'
-- for 'cancelling'. Used by the broker (runs found through index sets) and by
-- Client.cancel (a run id given directly).
-- KEYS[1 ..]  index sets to take run ids from (may be none)
-- ARGV[1]  run hash key prefix
-- ARGV[2]  signal stream key prefix (the worker id completes it)
-- ARGV[3]  id of the cancel event, or '' for a cancel by run id
-- ARGV[4]  reason
-- ARGV[5]  cancelled_by (the event id, or 'api')
-- ARGV[6]  approximate maximum length of a signal stream
-- ARGV[7]  runs whose cancel signal is unacknowledged (zset key; re-sent until acknowledged)
-- ARGV[8 ..]  run ids given directly
-- Returns a flat list: run id, outcome, status after the request (or '' when not found).
-- A cancel event never cancels the run it triggered, nor a run whose trigger came after
-- it (the user clicked Regenerate after Cancel; or the broker is catching up on a backlog).
local run_prefix, signal_prefix = ARGV[1], ARGV[2]
local event_id, reason, cancelled_by, maxlen = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local unacknowledged = ARGV[7]
local now = redis.call('TIME')
local now_ms = string.format('%.0f', now[1] * 1000 + math.floor(now[2] / 1000))
local seen, results = {}, {}

-- Stream ids ("1700000000000-3") in numeric order.
local function id_after(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)%-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)%-(%d+)$')
  if not a_ms or not b_ms then
    return false
  end
  a_ms, b_ms = tonumber(a_ms), tonumber(b_ms)
  return a_ms > b_ms or (a_ms == b_ms and tonumber(a_seq) > tonumber(b_seq))
end

local function consider(run_id, index_key)
  if seen[run_id] then
    return
  end
  seen[run_id] = true
  local run = redis.call('HMGET', run_prefix .. run_id, 'status', 'worker_id', 'event_id',
    'trigger_seq')
  local status, worker_id, trigger_id, trigger_seq = run[1], run[2], run[3], run[4]
  local outcome
  if not status then
    outcome, status = 'not_found', ''
    if index_key then
      -- An index entry whose run record is gone can never match again.
      redis.call('SREM', index_key, run_id)
    end
  elseif event_id ~= '' and trigger_id == event_id then
    outcome = 'own_trigger'
  elseif event_id ~= '' and trigger_seq and id_after(trigger_seq, event_id) then
    outcome = 'started_after_cancel'
  elseif status == 'running' then
    redis.call('HSET', run_prefix .. run_id, 'status', 'cancelling', 'cancel_reason', reason,
      'cancelled_by', cancelled_by, 'cancel_requested_at', now_ms)
    redis.call('XADD', signal_prefix .. worker_id, 'MAXLEN', '~', maxlen, '*',
      'run_id', run_id, 'reason', reason, 'event_id', event_id, 'sent_at', now_ms)
    redis.call('ZADD', unacknowledged, now_ms, run_id)
    outcome, status = 'signalled', 'cancelling'
  elseif status == 'cancelling' then
    outcome = 'already_cancelling'
  else
    outcome = 'already_finished'
  end
  results[#results + 1] = run_id
  results[#results + 1] = outcome
  results[#results + 1] = status
end

for _, key in ipairs(KEYS) do
  for _, run_id in ipairs(redis.call('SMEMBERS', key)) do
    consider(run_id, key)
  end
end
for i = 8, #ARGV do
  consider(ARGV[i], nil)
end
return results
