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
    -- The signal first: a script stopped by an error between the two (a publisher whose
    -- ACL lacks a key, sdk/lua/publish_event.lua) leaves a run signalled, never one
    -- marked cancelling that no signal will reach.
    if worker ~= c.holder then
      send_signal(c, worker, id, reason, request.event_id, false)
    end
    mark_cancelling(c.run_prefix .. id, reason, by, request.event_id, c.now, request.cancel_at)
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


-- A cancel event's expiry spec for one selector ('' none, ms after the run's start, or 'u'
-- and the Unix ms it stops listening at): its timeout and its instant.
local function expiry(spec)
  if string.sub(spec, 1, 1) == 'u' then
    return nil, tonumber(string.sub(spec, 2))
  end
  return tonumber(spec), nil
end

-- Look a cancel event's lookups up in the cancel index and cancel the running runs they
-- find (broker/lua/match_events.lua, and sdk/lua/publish_event.lua as an SDK publishes).
-- request: reason, cancelled_by, event_id, cancel_at
-- lookups: {index = set key, mode = 'm' (the key alone decides) or 'c' (an expression
--   must also hold), spec = expiry spec}, in order
-- Returns results, one {run id, outcome, previous, status, {cascaded}} per run looked at,
-- and candidates, {run id, i, the run's trigger JSON} for running runs under a lookup with
-- an expression.
local function match_lookups(c, request, lookups)
  local event_id = request.event_id
  local order, outcome, previous, cascades, candidates = {}, {}, {}, {}, {}
  local function decide(run_id, value, status)
    if outcome[run_id] == nil then
      order[#order + 1] = run_id
    end
    outcome[run_id], previous[run_id] = value, status
  end

  for i, lookup in ipairs(lookups) do
    local timeout, until_ms = expiry(lookup.spec)
    for _, run_id in ipairs(redis.call('SMEMBERS', lookup.index)) do
      -- A run one selector already cancelled (or found finished) is decided.
      local decided = outcome[run_id] == 'signalled' or previous[run_id] == ''
      if not decided then
        local run = redis.call('HMGET', c.run_prefix .. run_id, 'status', 'worker_id', 'event_id',
          'trigger_seq', 'started_at')
        local status = run[1]
        if not status then
          redis.call('SREM', lookup.index, run_id) -- its record is gone: it can never match again
          decide(run_id, 'not_found', '')
        elseif run[3] == event_id then
          decide(run_id, 'own_trigger', status)
        elseif id_after(run[4], event_id) then
          decide(run_id, 'started_after_cancel', status)
        elseif (timeout and request.cancel_at > (tonumber(run[5]) or 0) + timeout)
          or (until_ms and request.cancel_at > until_ms) then
          if outcome[run_id] == nil then
            decide(run_id, 'rule_expired', status)
          end
        elseif status ~= 'running' then
          decide(run_id, SETTLED[status] or 'already_cancelling', status)
        elseif lookup.mode == 'm' then
          cascades[run_id] = cancel_run(c, run_id, run[2], request)
          decide(run_id, 'signalled', status)
        else
          local trigger = redis.call('HGET', c.run_prefix .. run_id, 'event')
          candidates[#candidates + 1] = {run_id, i, trigger}
          if outcome[run_id] == nil or outcome[run_id] == 'rule_expired' then
            decide(run_id, 'evaluated', status)
          end
        end
      end
    end
  end

  local results = {}
  for _, run_id in ipairs(order) do
    local value = outcome[run_id]
    local after = value == 'signalled' and 'cancelling' or previous[run_id]
    results[#results + 1] = {run_id, value, previous[run_id], after, cascades[run_id] or {}}
  end
  return results, candidates
end
