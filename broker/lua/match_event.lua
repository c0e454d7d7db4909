-- Apply one cancel event to the cancel index (the broker).
-- First leave a tombstone under every selector declared for the event's name, so that a
-- run registering later with a matching key is cancelled by this event; then look the
-- event's keys up. Both happen in this one script: a run is either in the index when the
-- lookup runs, or registers after the tombstone exists (register_run.lua checks it).
-- KEYS[1]  runs whose cancel signal is unacknowledged (zset)
-- KEYS[2]  the event's JSON kept for tombstones of rules with an expression
-- KEYS[2 + 2i - 1], KEYS[2 + 2i]  index set and tombstone of selector i (i = 1 .. n)
-- ARGV[1 .. 4]  see cancel_context in lib.lua
-- ARGV[5]  the cancel event's id
-- ARGV[6]  the cancel event's name (the reason says it)
-- ARGV[7]  when the event was published (ms)
-- ARGV[8]  how long tombstones count (ms); 0 keeps none
-- ARGV[9]  the event's JSON, or '' when no selector has an expression
-- ARGV[10] n
-- ARGV[11 + 2(i-1)], ARGV[12 + 2(i-1)]  selector i: 'm' (the key alone decides) or 'c'
--          (an expression must also hold), and its timeout: ms after the run's start,
--          'u' and the Unix ms it stops listening at, or '' for none
-- Returns {results, candidates}: results, one {run id, outcome, previous, status,
-- {cascaded}} per run looked at; candidates, {run id, i, the run's trigger JSON} for
-- running runs under a selector with an expression, which the broker evaluates.
local TOMBSTONES_KEPT = 64
local c = cancel_context()
local event_id, lookback = ARGV[5], tonumber(ARGV[8])
local request = {
  reason = REASON.event(ARGV[6]),
  cancelled_by = event_id,
  event_id = event_id,
  cancel_at = tonumber(ARGV[7]),
}
local n = tonumber(ARGV[10])

-- Selector i's timeout after the run's start (ms), and the instant it stops listening.
local function expiry(i)
  local spec = ARGV[10 + 2 * i]
  if string.sub(spec, 1, 1) == 'u' then
    return nil, tonumber(string.sub(spec, 2))
  end
  return tonumber(spec), nil
end

if lookback > 0 then
  for i = 1, n do
    local _, until_ms = expiry(i)
    -- A rule that stopped listening before this event leaves no tombstone: no run that
    -- registers later may be cancelled by it.
    if not (until_ms and request.cancel_at > until_ms) then
      local tombstone = KEYS[2 + 2 * i]
      redis.call('ZADD', tombstone, c.now + lookback, event_id)
      redis.call('ZREMRANGEBYSCORE', tombstone, '-inf', c.now)
      redis.call('ZREMRANGEBYRANK', tombstone, 0, -(TOMBSTONES_KEPT + 1))
      redis.call('PEXPIRE', tombstone, lookback)
    end
  end
  if ARGV[9] ~= '' then
    redis.call('SET', KEYS[2], ARGV[9], 'PX', lookback)
  end
end

local order, outcome, previous, cascades, candidates = {}, {}, {}, {}, {}
local function decide(run_id, value, status)
  if outcome[run_id] == nil then
    order[#order + 1] = run_id
  end
  outcome[run_id], previous[run_id] = value, status
end

for i = 1, n do
  local index = KEYS[1 + 2 * i]
  local mode = ARGV[9 + 2 * i]
  local timeout, until_ms = expiry(i)
  for _, run_id in ipairs(redis.call('SMEMBERS', index)) do
    -- A run one selector already cancelled (or found finished) is decided.
    local decided = outcome[run_id] == 'signalled' or previous[run_id] == ''
    if not decided then
      local run = redis.call('HMGET', c.run_prefix .. run_id, 'status', 'worker_id', 'event_id',
        'trigger_seq', 'started_at')
      local status = run[1]
      if not status then
        redis.call('SREM', index, run_id) -- its record is gone: it can never match again
        decide(run_id, 'not_found', '')
      elseif run[3] == event_id then
        decide(run_id, 'own_trigger', status)
      elseif id_after(run[4], event_id) then
        decide(run_id, 'started_after_cancel', status)
      elseif (timeout and request.cancel_at > (tonumber(run[5]) or 0) + timeout)
        or (until_ms and request.cancel_at > until_ms) then
        if outcome[run_id] == nil then
          decide(run_id, 'rule_expired', status)
        end
      elseif status ~= 'running' then
        decide(run_id, SETTLED[status] or 'already_cancelling', status)
      elseif mode == 'm' then
        cascades[run_id] = cancel_run(c, run_id, run[2], request)
        decide(run_id, 'signalled', status)
      else
        local trigger = redis.call('HGET', c.run_prefix .. run_id, 'event')
        candidates[#candidates + 1] = {run_id, i, trigger}
        if outcome[run_id] == nil or outcome[run_id] == 'rule_expired' then
          decide(run_id, 'evaluated', status)
        end
      end
    end
  end
end

local results = {}
for _, run_id in ipairs(order) do
  local value = outcome[run_id]
  local after = value == 'signalled' and 'cancelling' or previous[run_id]
  results[#results + 1] = {run_id, value, previous[run_id], after, cascades[run_id] or {}}
end
return {results, candidates}
