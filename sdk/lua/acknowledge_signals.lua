-- A worker acted on the cancel signals it read: they are no longer re-sent, the entries it
-- read leave its stream, and how long each took to arrive is counted, on the Redis clock
-- (sent_at came from it too, so hosts' clocks never enter the figure).
-- KEYS[1]  runs whose cancel signal is unacknowledged (zset)
-- KEYS[2]  the worker's signal stream
-- KEYS[3]  signal statistics (hash)
-- ARGV[1]  the last entry id the worker read (entries up to it are trimmed)
-- ARGV[2]  m, the number of histogram buckets
-- ARGV[3 .. 2+m]       their upper bounds, in seconds, ascending
-- ARGV[3+m ..]         run id, sent_at (ms) pairs, one per signal acted on
-- Returns the delivery time of each signal, in seconds, as strings.
local now = clock()
local m = tonumber(ARGV[2])
local delays, total = {}, 0
for i = 3 + m, #ARGV, 2 do
  redis.call('ZREM', KEYS[1], ARGV[i])
  local sent_at = tonumber(ARGV[i + 1])
  if sent_at and sent_at > 0 then
    local seconds = math.max(0, now - sent_at) / 1000
    local bucket = 'inf'
    for b = 1, m do
      if seconds <= tonumber(ARGV[2 + b]) then
        bucket = tostring(b)
        break
      end
    end
    redis.call('HINCRBY', KEYS[3], FIELD.delivery(bucket), 1)
    total = total + seconds
    delays[#delays + 1] = string.format('%.6f', seconds)
  end
end
local acknowledged = (#ARGV - 2 - m) / 2
if acknowledged > 0 then
  redis.call('HINCRBY', KEYS[3], 'acknowledged', acknowledged)
end
if #delays > 0 then
  redis.call('HINCRBY', KEYS[3], FIELD.delivery('count'), #delays)
  redis.call('HINCRBYFLOAT', KEYS[3], FIELD.delivery('sum'), string.format('%.6f', total))
end
redis.call('XTRIM', KEYS[2], 'MINID', '~', ARGV[1])
return delays
