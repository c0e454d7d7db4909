-- Apply a batch of cancel events, in order, to the cancel index of one partition (the
-- broker). For each event, first leave a tombstone under every selector declared for its
-- name, so that a run registering later with a matching key is cancelled by it; then look
-- its keys up. Both happen in this one script: a run is either in the index when the
-- lookup runs, or registers after the tombstone exists (register_run.lua checks it).
-- One script per batch, its events in one JSON argument: Redis and the broker pay one
-- call, not one per event.
-- KEYS[1]  runs whose cancel signal is unacknowledged (zset)
-- KEYS[2 ..]  every key the batch names (its lookups' index sets and tombstones, each
--          event's tombstoned JSON and early-match record), declared so that a slot
--          being migrated answers ASK or TRYAGAIN for the whole call; read from ARGV[8]
-- ARGV[1 .. 4]  see cancel_context in lib.lua
-- ARGV[5]  how long tombstones count (ms); 0 keeps none
-- ARGV[6]  the prefix of tombstoned events' JSON (kept for rules with an expression)
-- ARGV[7]  the prefix of early-match records (the runs an SDK publisher signalled)
-- ARGV[8]  the batch, JSON: one [event id, name, published at (ms), its JSON or '' when
--          no selector has an expression, lookups] per event; a lookup is [index set,
--          tombstone, 'm' (the key alone decides) or 'c' (an expression must also hold),
--          expiry spec (see expiry in lib.lua)]
-- Returns one {results, candidates} (or {false, error}) per event: results, one {run id, outcome, previous,
-- status, {cascaded}} per run looked at; candidates, {run id, i, the run's trigger JSON}
-- for running runs under a selector with an expression, which the broker evaluates.
local TOMBSTONES_KEPT = 64
local c = cancel_context()
local lookback = tonumber(ARGV[5])
local tomb_events, early_prefix = ARGV[6], ARGV[7]

-- The runs the publisher signalled: in the event's decision too, though they may have
-- ended (and left the index) since.
local function take_early(event_id, results)
  local key = early_prefix .. event_id
  local early = redis.call('GET', key)
  if not early then
    return
  end
  redis.call('DEL', key)
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

local function match_one(event)
  local event_id, name, at, body, found = event[1], event[2], event[3], event[4], event[5]
  local request = {
    reason = REASON.event(name),
    cancelled_by = event_id,
    event_id = event_id,
    cancel_at = at,
  }
  local lookups = {}
  for i, lookup in ipairs(found) do
    lookups[i] = {index = lookup[1], mode = lookup[3], spec = lookup[4]}
  end
  if lookback > 0 then
    for _, lookup in ipairs(found) do
      local _, until_ms = expiry(lookup[4])
      -- A rule that stopped listening before this event leaves no tombstone: no run that
      -- registers later may be cancelled by it.
      if not (until_ms and at > until_ms) then
        local tombstone = lookup[2]
        redis.call('ZADD', tombstone, c.now + lookback, event_id)
        redis.call('ZREMRANGEBYSCORE', tombstone, '-inf', c.now)
        redis.call('ZREMRANGEBYRANK', tombstone, 0, -(TOMBSTONES_KEPT + 1))
        redis.call('PEXPIRE', tombstone, lookback)
      end
    end
    if body ~= '' then
      redis.call('SET', tomb_events .. event_id, body, 'PX', lookback)
    end
  end
  local results, candidates = match_lookups(c, request, lookups)
  take_early(event_id, results)
  return {results, candidates}
end

-- An event whose matching fails (a key of the wrong type) fails alone: {false, error}.
local replies = {}
for i, event in ipairs(cjson.decode(ARGV[8])) do
  local ok, reply = pcall(match_one, event)
  if ok then
    replies[i] = reply
  else
    replies[i] = {false, tostring(type(reply) == 'table' and reply.err or reply)}
  end
end
return replies
