-- Send again the cancel signals no worker acknowledged in time (a signal stream trimmed or
-- deleted, a worker that missed it): delivery is at least once.
-- KEYS[1]  runs whose cancel signal is unacknowledged (zset, scored by when last sent, ms)
-- ARGV[1]  run hash key prefix
-- ARGV[2]  signal stream key prefix
-- ARGV[3]  re-send signals unacknowledged for this many ms
-- ARGV[4]  most signals re-sent by one call
-- ARGV[5]  approximate maximum length of a signal stream
-- Returns the ids of the runs whose signal was sent again.
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms - tonumber(ARGV[3]),
  'LIMIT', 0, tonumber(ARGV[4]))
local resent = {}
for _, run_id in ipairs(due) do
  local run = redis.call('HMGET', ARGV[1] .. run_id, 'status', 'worker_id', 'cancel_reason',
    'cancel_event_id')
  if run[1] == 'cancelling' then
    local event_id = run[4] or ''
    redis.call('XADD', ARGV[2] .. run[2], 'MAXLEN', '~', ARGV[5], '*',
      'run_id', run_id, 'reason', run[3] or '', 'event_id', event_id,
      'sent_at', string.format('%.0f', now_ms), 'resent', '1')
    redis.call('ZADD', KEYS[1], string.format('%.0f', now_ms), run_id)
    resent[#resent + 1] = run_id
  else
    redis.call('ZREM', KEYS[1], run_id)
  end
end
return resent
