-- Send again the cancel signals no worker acknowledged in time (a signal stream trimmed or
-- deleted, a worker that missed it): delivery is at least once.
-- KEYS[1]  runs whose cancel signal is unacknowledged (zset, scored by when last sent, ms)
-- ARGV[1 .. 4]  see cancel_context in lib.lua
-- ARGV[5]  re-send signals unacknowledged for this many ms
-- ARGV[6]  most signals re-sent by one call
-- Returns the ids of the runs whose signal was sent again.
local c = cancel_context()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', c.now - tonumber(ARGV[5]),
  'LIMIT', 0, tonumber(ARGV[6]))
local resent = {}
for _, run_id in ipairs(due) do
  local run = redis.call('HMGET', c.run_prefix .. run_id, 'status', 'worker_id',
    'cancel_reason', 'cancel_event_id')
  if run[1] == 'cancelling' then
    send_signal(c, run[2], run_id, run[3] or '', run[4] or '', true)
    resent[#resent + 1] = run_id
  else
    redis.call('ZREM', KEYS[1], run_id)
  end
end
return resent
