-- Register a run and its index entries, atomically.
-- KEYS[1]  run hash
-- KEYS[2]  active runs (zset)
-- KEYS[3]  runs of the trigger event (set)
-- KEYS[4]  the app's active runs per function configuration (hash)
-- KEYS[5 .. 4+n]      index sets, one per (event, path, value) the run listens on
-- KEYS[5+n .. 4+2n]   listener hashes of those index entries
-- ARGV[1]  run id
-- ARGV[2]  'function_id:config_hash' (the field counted in KEYS[4])
-- ARGV[3]  n
-- ARGV[4 .. 3+n]      match paths, aligned with the index sets
-- ARGV[4+n]           record retention in seconds (applied to the event-runs set)
-- ARGV[5+n ..]        run hash fields, as field/value pairs
-- Returns 'registered', or the existing run's status when the id is taken
-- (a trigger delivered twice never starts a second run).
local existing = redis.call('HGET', KEYS[1], 'status')
if existing then
  return existing
end
local run_id = ARGV[1]
local n = tonumber(ARGV[3])
local retention = ARGV[4 + n]
local now = redis.call('TIME')
local now_ms = string.format('%.0f', now[1] * 1000 + math.floor(now[2] / 1000))

local fields = {'status', 'running', 'started_at', now_ms}
for i = 5 + n, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], now_ms, run_id)
redis.call('SADD', KEYS[3], run_id)
redis.call('EXPIRE', KEYS[3], retention)
redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
for i = 1, n do
  redis.call('SADD', KEYS[4 + i], run_id)
  redis.call('HINCRBY', KEYS[4 + n + i], ARGV[3 + i], 1)
end
return 'registered'
