-- Record a run's end and remove it from the index, atomically. Terminal states are final.
-- A cancelled run publishes the outcome event (cancel/run.cancelled) other functions can
-- trigger on; every end is announced on the run's 'finished' channel (Client.wait).
-- KEYS[1]  run hash
-- KEYS[2]  active runs (zset)
-- KEYS[3]  the app's active runs per function configuration (hash)
-- KEYS[4]  the holding worker's unfinished runs (set)
-- KEYS[5]  runs whose cancel signal is unacknowledged (zset)
-- KEYS[6]  the function's unfinished runs (zset)
-- KEYS[7]  the run's children (set)
-- KEYS[8]  the events stream (for the outcome event)
-- KEYS[9]  finished runs per app/function/outcome (hash)
-- KEYS[10] recently finished runs (zset, scored by when each ended; capped)
-- KEYS[11 ..]  index sets the run was registered under
-- ARGV[1]  run id
-- ARGV[2]  outcome: completed | cancelled | failed | lost
-- ARGV[3]  record retention in seconds
-- ARGV[4]  ms since the body stopped ('' when unknown): the stop time is taken on the
--          Redis clock, as the cancel's was, so the latency does not depend on host clocks
-- ARGV[5]  the run's 'finished' channel
-- ARGV[6]  name of the outcome event; ARGV[7] the field events are written in
-- ARGV[8]  how many recently finished runs KEYS[10] keeps
-- ARGV[9 ..]  extra run hash fields (error, cancel_reason, abandoned_thread, escalated,
--             on_cancel_error, continued_by), as field/value pairs
-- Returns {the status the run had before, the cancel latency in ms or ''}, or false when the
-- run is unknown.
local previous = redis.call('HGET', KEYS[1], 'status')
if not previous then
  return false
end
if TERMINAL[previous] then
  return {previous, ''}
end
local run_id, outcome = ARGV[1], ARGV[2]
local now = clock()
local finished_at = ms(now)

local fields = {'status', outcome, 'finished_at', finished_at}
for i = 9, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZREM', KEYS[2], run_id)
redis.call('SREM', KEYS[4], run_id)
redis.call('ZREM', KEYS[5], run_id)
redis.call('ZREM', KEYS[6], run_id)
redis.call('EXPIRE', KEYS[7], ARGV[3])
local run = redis.call('HMGET', KEYS[1], 'function_id', 'config_hash', 'app_id', 'event',
  'cancel_reason', 'cancelled_by', 'cancel_event_at', 'parent_run_id', 'event_id')
if run[1] and run[2] then
  local config = FIELD.run_config(run[1], run[2])
  if redis.call('HINCRBY', KEYS[3], config, -1) <= 0 then
    redis.call('HDEL', KEYS[3], config)
  end
end
redis.call('ZADD', KEYS[10], finished_at, run_id)
redis.call('ZREMRANGEBYRANK', KEYS[10], 0, -1 - tonumber(ARGV[8]))
for i = 11, #KEYS do
  redis.call('SREM', KEYS[i], run_id)
end
if run[3] and run[1] then
  redis.call('HINCRBY', KEYS[9], FIELD.finished(run[3], run[1], outcome), 1)
end

local latency = 'null'
if outcome == 'cancelled' then
  local cancel_at = tonumber(run[7])
  local stopped = tonumber(ARGV[4])
  if cancel_at and stopped then
    local value = math.max(0, now - stopped - cancel_at)
    latency = string.format('%.3f', value)
    redis.call('HSET', KEYS[1], 'cancel_latency_ms', latency)
  end
  local function quoted(value)
    if not value or value == '' then
      return 'null'
    end
    -- cjson writes '/' as '\/'; both are JSON, the plain one is what other tools expect.
    -- (A backslash is always written '\\', so only that escape puts '\' before a '/'.)
    return (string.gsub(cjson.encode(value), '\\/', '/'))
  end
  local trigger = run[4] or 'null'
  if #trigger > 16384 then -- the outcome event must stay within the event size limit
    trigger = '{"id":' .. quoted(run[9]) .. ',"truncated":true}'
  end
  local body = '{"name":' .. quoted(ARGV[6]) .. ',"v":1,"data":{"run_id":' .. quoted(run_id)
    .. ',"app_id":' .. quoted(run[3]) .. ',"function_id":' .. quoted(run[1])
    .. ',"event":' .. trigger .. ',"reason":' .. quoted(run[5])
    .. ',"cancelled_by":' .. quoted(run[6]) .. ',"parent_run_id":' .. quoted(run[8])
    .. ',"latency_ms":' .. latency .. '}}'
  redis.call('XADD', KEYS[8], '*', ARGV[7], body)
end
redis.call('PUBLISH', ARGV[5], outcome)
return {previous, latency == 'null' and '' or latency}
