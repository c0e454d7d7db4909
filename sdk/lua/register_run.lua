-- Register a run and its index entries, atomically.
-- KEYS[1]  run hash
-- KEYS[2]  active runs (zset)
-- KEYS[3]  runs of the trigger event (set)
-- KEYS[4]  the app's active runs per function configuration (hash)
-- KEYS[5]  the worker's unfinished runs (set)
-- KEYS[6 .. 5+n]      index sets, one per (event, path, value) the run listens on
-- KEYS[6+n .. 5+2n]   listener hashes of those index entries
-- ARGV[1]  run id
-- ARGV[2]  'function_id:config_hash' (the field counted in KEYS[4])
-- ARGV[3]  worker id
-- ARGV[4]  n
-- ARGV[5 .. 4+n]      match paths, aligned with the index sets
-- ARGV[5+n]           record retention in seconds (applied to the event-runs set)
-- ARGV[6+n ..]        run hash fields, as field/value pairs
-- Returns 'registered', or the existing run's status when the id is taken (a trigger
-- delivered twice never starts a second run). A retry by the worker that registered the
-- run (its first reply was lost) gets 'registered' again: the registration is its own.
local existing = redis.call('HMGET', KEYS[1], 'status', 'worker_id')
if existing[1] then
  if existing[1] == 'running' and existing[2] == ARGV[3] then
    return 'registered'
  end
  return existing[1]
end
local run_id = ARGV[1]
local n = tonumber(ARGV[4])
local retention = ARGV[5 + n]
local now = redis.call('TIME')
local now_ms = string.format('%.0f', now[1] * 1000 + math.floor(now[2] / 1000))

local fields = {'status', 'running', 'started_at', now_ms}
local event_id
for i = 6 + n, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
  if ARGV[i] == 'event_id' then
    event_id = ARGV[i + 1]
  end
end
-- Where the run stands in the order of events: its trigger's stream id, or for a run
-- whose trigger did not come through the stream, the moment it registered.
local trigger_seq = now_ms .. '-0'
if event_id and string.match(event_id, '^%d+%-%d+$') then
  trigger_seq = event_id
end
fields[#fields + 1] = 'trigger_seq'
fields[#fields + 1] = trigger_seq
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], now_ms, run_id)
redis.call('SADD', KEYS[3], run_id)
redis.call('EXPIRE', KEYS[3], retention)
redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
redis.call('SADD', KEYS[5], run_id)
for i = 1, n do
  redis.call('SADD', KEYS[5 + i], run_id)
  redis.call('HINCRBY', KEYS[5 + n + i], ARGV[4 + i], 1)
end
return 'registered'
