-- The scripts' shared library: sdk/scripts.py loads it in front of every script (the SDK's
-- and the broker's), so the clock, the statuses, the signal a worker reads and the reasons
-- a cancel gives are written once. It only defines locals: loading it calls nothing.

-- Now on the Redis clock, in ms with the fraction (latencies) or whole (what is stored).
local function clock()
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000 + tonumber(now[2]) / 1000
end

local function clock_ms()
  return math.floor(clock())
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

-- The statuses a run never leaves (sdk/wire.py TERMINAL_STATUSES).
local TERMINAL = {cancelled = true, completed = true, failed = true, lost = true}

-- What a cancel request says about a run that is no longer running.
local SETTLED = {
  cancelling = 'already_cancelling',
  completed = 'already_completed',
  cancelled = 'already_cancelled',
  failed = 'already_failed',
  lost = 'lost',
}

-- The reasons a cancel gives, and who it says cancelled the run.
local REASON = {
  event = function(name)
    return 'cancel event ' .. name
  end,
  tombstone = function(name)
    return 'cancel event ' .. name .. ' (it arrived before the run registered)'
  end,
  parent = function(parent_id)
    return 'parent run ' .. parent_id .. ' was cancelled'
  end,
}
local BY = {
  api = 'api',
  parent = function(parent_id)
    return 'parent:' .. parent_id
  end,
}

-- Composite hash fields the scripts write; sdk/keys.py reads them with the same layout
-- (run_config_field, finished_field, delivery_field).
local FIELD = {
  -- {ns}:app:{app}:run-configs: active runs per function configuration
  run_config = function(function_id, config_hash)
    return function_id .. ':' .. config_hash
  end,
  -- {ns}:stats:runs-finished: runs that finished so
  finished = function(app_id, function_id, outcome)
    return app_id .. '/' .. function_id .. '/' .. outcome
  end,
  -- {ns}:stats:signals: the delivery-time histogram (bucket i from 1, 'inf', 'count', 'sum')
  delivery = function(bucket)
    return 'delivery:' .. bucket
  end,
}

-- A run moves to 'cancelling': why, who asked, and when (now, and when the cancel was
-- published, which the cancel latency is measured from).
local function mark_cancelling(run_key, reason, by, event_id, now, cancel_at)
  redis.call('HSET', run_key, 'status', 'cancelling', 'cancel_reason', reason,
    'cancelled_by', by, 'cancel_requested_at', ms(now), 'cancel_event_at', ms(cancel_at),
    'cancel_event_id', event_id)
end

-- The signal a worker reads from its stream (sdk/wire.py Signal), recorded unacknowledged
-- until the worker acts on it (acknowledge_signals.lua); re-sent until then.
-- c: signal_prefix, maxlen, unacknowledged, now (see cancel_context)
local function send_signal(c, worker_id, run_id, reason, event_id, resent)
  local fields = {'run_id', run_id, 'reason', reason, 'event_id', event_id,
    'sent_at', ms(c.now)}
  if resent then
    fields[#fields + 1] = 'resent'
    fields[#fields + 1] = '1'
  end
  redis.call('XADD', c.signal_prefix .. worker_id, 'MAXLEN', '~', c.maxlen, '*', unpack(fields))
  redis.call('ZADD', c.unacknowledged, ms(c.now), run_id)
end

-- Move a running run to 'cancelling', signal its worker, and do the same for every running
-- run started inside it (its subtree). A run held by c.holder (the worker calling the
-- script, which cancels it itself) gets no signal.
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
    mark_cancelling(c.run_prefix .. id, reason, by, request.event_id, c.now, request.cancel_at)
    if worker ~= c.holder then
      send_signal(c, worker, id, reason, request.event_id, false)
    end
    for _, child in ipairs(redis.call('SMEMBERS', c.children_prefix .. id)) do
      local state = redis.call('HMGET', c.run_prefix .. child, 'status', 'worker_id')
      if state[1] == 'running' then
        queue[#queue + 1] = {child, state[2], REASON.parent(id), BY.parent(id)}
        cascaded[#cascaded + 1] = child
      end
    end
    head = head + 1
  end
  return cascaded
end

-- The context cancel_run and send_signal need, from the layout every script that signals
-- shares (sdk/scripts.py cancel_context): ARGV[1] run hash prefix, ARGV[2] signal stream
-- prefix, ARGV[3] children set prefix, ARGV[4] approximate maximum length of a signal
-- stream; KEYS[1] unacknowledged signals.
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

