-- Apply one cancel event to the cancel index (the broker).
-- First leave a tombstone under every selector declared for the event's name, so that a
-- run registering later with a matching key is cancelled by this event; then look the
-- event's keys up. Both happen in this one script: a run is either in the index when the
-- lookup runs, or registers after the tombstone exists (register_run.lua checks it).
-- KEYS[1]  runs whose cancel signal is unacknowledged (zset)
-- KEYS[2]  the event's JSON kept for tombstones of rules with an expression
-- KEYS[3]  the runs an SDK publisher signalled as it published the event (JSON, taken)
-- KEYS[3 + 2i - 1], KEYS[3 + 2i]  index set and tombstone of selector i (i = 1 .. n)
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

local lookups = {}
for i = 1, n do
  lookups[i] = {index = KEYS[2 + 2 * i], mode = ARGV[9 + 2 * i], spec = ARGV[10 + 2 * i]}
end

if lookback > 0 then
  for i = 1, n do
    local _, until_ms = expiry(lookups[i].spec)
    -- A rule that stopped listening before this event leaves no tombstone: no run that
    -- registers later may be cancelled by it.
    if not (until_ms and request.cancel_at > until_ms) then
      local tombstone = KEYS[3 + 2 * i]
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

local results, candidates = match_lookups(c, request, lookups)
-- The runs the publisher signalled: in this decision too, though they may have ended
-- (and left the index) since.
local early = redis.call('GET', KEYS[3])
if early then
  redis.call('DEL', KEYS[3])
  local line = {}
  for i, result in ipairs(results) do
    line[result[1]] = i
  end
  for _, result in ipairs(cjson.decode(early)) do
    local run_id = result[1]
    if result[2] == 'signalled' then
      local signalled = {run_id, 'signalled', 'running', 'cancelling', result[5] or {}}
      if not line[run_id] then
        results[#results + 1] = signalled
      elseif results[line[run_id]][2] == 'already_cancelling' then
        results[line[run_id]] = signalled
      end
    end
  end
end
return {results, candidates}
