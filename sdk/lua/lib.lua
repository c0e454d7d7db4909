-- Shared by the scripts that cancel runs; store.py loads it in front of each of them.

local function clock_ms()
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end

local function ms(value)
  return string.format('%.0f', value)
end

-- Event ids in the order of their stream ids ("1700000000000-3"; in partitions 1 and up
-- the id carries its partition, "1700000000000-3:2", which does not change its place).
local function id_after(a, b)
  local a_ms, a_seq = string.match(a or '', '^(%d+)%-(%d+)')
  local b_ms, b_seq = string.match(b or '', '^(%d+)%-(%d+)')
  if not a_ms or not b_ms then
    return false
  end
  a_ms, b_ms = tonumber(a_ms), tonumber(b_ms)
  return a_ms > b_ms or (a_ms == b_ms and tonumber(a_seq) > tonumber(b_seq))
end

local function id_ms(id)
  local found = string.match(id or '', '^(%d+)%-%d+')
  return found and tonumber(found)
end

local TERMINAL = {cancelled = true, completed = true, failed = true, lost = true}

-- What a cancel request says about a run that is no longer running.
local SETTLED = {
  cancelling = 'already_cancelling',
  completed = 'already_completed',
  cancelled = 'already_cancelled',
  failed = 'already_failed',
  lost = 'lost',
}

-- Move a running run to 'cancelling', append a signal to its worker's stream, and do the
-- same for every running run started inside it (its subtree). A run held by c.holder (the
-- worker calling the script, which cancels it itself) gets no signal.
-- c: run_prefix, signal_prefix, children_prefix, unacknowledged (zset key), maxlen, now,
--    holder
-- request: reason, cancelled_by, event_id, cancel_at (ms the cancel was published)
-- Returns the ids of the descendants that were signalled.
local function cancel_run(c, run_id, worker_id, request)
  local queue = {{run_id, worker_id, request.reason, request.cancelled_by}}
  local cascaded = {}
  local head = 1
  while head <= #queue do
    local id, worker, reason, by = queue[head][1], queue[head][2], queue[head][3], queue[head][4]
    redis.call('HSET', c.run_prefix .. id, 'status', 'cancelling', 'cancel_reason', reason,
      'cancelled_by', by, 'cancel_requested_at', ms(c.now), 'cancel_event_at',
      ms(request.cancel_at), 'cancel_event_id', request.event_id)
    if worker ~= c.holder then
      redis.call('XADD', c.signal_prefix .. worker, 'MAXLEN', '~', c.maxlen, '*',
        'run_id', id, 'reason', reason, 'event_id', request.event_id, 'sent_at', ms(c.now))
      redis.call('ZADD', c.unacknowledged, c.now, id)
    end
    for _, child in ipairs(redis.call('SMEMBERS', c.children_prefix .. id)) do
      local state = redis.call('HMGET', c.run_prefix .. child, 'status', 'worker_id')
      if state[1] == 'running' then
        queue[#queue + 1] = {child, state[2], 'parent run ' .. id .. ' was cancelled',
          'parent:' .. id}
        cascaded[#cascaded + 1] = child
      end
    end
    head = head + 1
  end
  return cascaded
end

-- The context cancel_run needs, from the ARGV layout both cancelling scripts share:
-- ARGV[1] run hash prefix, ARGV[2] signal stream prefix, ARGV[3] children set prefix,
-- ARGV[4] approximate maximum length of a signal stream; KEYS[1] unacknowledged signals.
local function cancel_context()
  return {
    run_prefix = ARGV[1],
    signal_prefix = ARGV[2],
    children_prefix = ARGV[3],
    maxlen = ARGV[4],
    unacknowledged = KEYS[1],
    now = clock_ms(),
    holder = false,
  }
end

