-- A worker says it is alive, on the Redis clock (so hosts' clocks never disagree).
-- KEYS[1]  live workers (zset, scored by last heartbeat in ms)
-- KEYS[2]  the worker's registration (hash)
-- ARGV[1]  worker id
-- ARGV[2]  registration TTL in seconds
-- Returns the heartbeat time in ms, or 0 when the registration is gone (sync again).
if redis.call('EXISTS', KEYS[2]) == 0 then
  return 0
end
local now_ms = ms(clock_ms())
redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
redis.call('HSET', KEYS[2], 'heartbeat_at', now_ms)
redis.call('EXPIRE', KEYS[2], ARGV[2])
return tonumber(now_ms)
