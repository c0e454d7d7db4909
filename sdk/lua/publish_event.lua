-- Publish a cancel event and match it at once (Client.send), so that its runs are
-- signalled in this round trip rather than after the broker's read: the by-id latency
-- for a cancel by event. The broker still handles the entry as it handles every event
-- (tombstones for runs registering later, rules with an expression, the decision): runs
-- this script signalled are in the broker's decision (kept for it under the early-match
-- key), and none is signalled twice.
-- KEYS[1]  runs whose cancel signal is unacknowledged (zset)
-- KEYS[2]  the events stream
-- KEYS[2 + i]  the index set of lookup i (i = 1 .. n; only lookups the key alone decides)
-- ARGV[1 .. 4]  see cancel_context in lib.lua
-- ARGV[5]  the stream field events are written in; ARGV[6] the event's JSON
-- ARGV[7]  the event's name
-- ARGV[8]  n
-- ARGV[8 + i]  lookup i's expiry spec (see expiry in lib.lua)
-- ARGV[9 + n]  the prefix of the early-match key, where the runs it signalled are kept
--              for the broker's decision; ARGV[10 + n] how long (ms)
-- Returns {event id, results} (results as match_lookups'), or {event id, false, error}
-- when the match failed (the caller's ACL does not reach run state): the event is
-- published either way, and the broker matches it.
-- The XADD first, everything else inside the pcall: a command the caller's ACL refuses
-- either refuses the whole script before anything is written, or comes after the event is
-- published, never between.
local event_id = redis.call('XADD', KEYS[2], '*', ARGV[5], ARGV[6])
local ok, results = pcall(function()
  local c = cancel_context()
  local n = tonumber(ARGV[8])
  local lookups = {}
  for i = 1, n do
    lookups[i] = {index = KEYS[2 + i], mode = 'm', spec = ARGV[8 + i]}
  end
  local request = {
    reason = REASON.event(ARGV[7]),
    cancelled_by = event_id,
    event_id = event_id,
    cancel_at = id_ms(event_id),
  }
  local results = match_lookups(c, request, lookups)
  if #results > 0 then
    redis.call('SET', ARGV[9 + n] .. event_id, cjson.encode(results), 'PX', ARGV[10 + n])
  end
  return results
end)
if not ok then
  return {event_id, false, tostring(type(results) == 'table' and results.err or results)}
end
return {event_id, results}
