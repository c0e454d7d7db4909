-- Record a run's end and remove it from the index, atomically. Terminal states are final.
-- KEYS[1]  run hash
-- KEYS[2]  active runs (zset)
-- KEYS[3]  the app's active runs per function configuration (hash)
-- KEYS[4]  the holding worker's unfinished runs (set)
-- KEYS[5]  runs whose cancel signal is unacknowledged (zset)
-- KEYS[6 .. 5+n]      index sets the run was registered under
-- KEYS[6+n .. 5+2n]   listener hashes of those index entries
-- ARGV[1]  run id
-- ARGV[2]  outcome: completed | cancelled | failed | lost
-- ARGV[3]  record retention in seconds
-- ARGV[4]  n
-- ARGV[5 .. 4+n]      match paths, aligned with the index sets
-- ARGV[5+n ..]        extra run hash fields (error, cancel_reason), as field/value pairs
-- Returns the status the run had before, or false when the run is unknown.
local previous = redis.call('HGET', KEYS[1], 'status')
if not previous then
  return false
end
if previous == 'cancelled' or previous == 'completed' or previous == 'failed' or previous == 'lost' then
  return previous
end
local run_id = ARGV[1]
local n = tonumber(ARGV[4])
local now = redis.call('TIME')
local now_ms = string.format('%.0f', now[1] * 1000 + math.floor(now[2] / 1000))

local fields = {'status', ARGV[2], 'finished_at', now_ms}
for i = 5 + n, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZREM', KEYS[2], run_id)
redis.call('SREM', KEYS[4], run_id)
redis.call('ZREM', KEYS[5], run_id)
local run = redis.call('HMGET', KEYS[1], 'function_id', 'config_hash')
if run[1] and run[2] then
  local config = run[1] .. ':' .. run[2]
  if redis.call('HINCRBY', KEYS[3], config, -1) <= 0 then
    redis.call('HDEL', KEYS[3], config)
  end
end
for i = 1, n do
  redis.call('SREM', KEYS[5 + i], run_id)
  if redis.call('HINCRBY', KEYS[5 + n + i], ARGV[4 + i], -1) <= 0 then
    redis.call('HDEL', KEYS[5 + n + i], ARGV[4 + i])
  end
end
return previous
