-- Register a run and its index entries, atomically.
-- A run is cancelled at once, in this same script, when the run it was started inside has
-- been cancelled; when a cancel by its id came before it registered (kept by
-- request_cancel.lua); when a bulk cancel of its function (Client.cancel_many) covers its
-- trigger's time; or when a cancel event that arrived before it registered (a tombstone,
-- see match_events.lua) matches it and is newer than its trigger.
-- KEYS[1]  run hash
-- KEYS[2]  active runs (zset)
-- KEYS[3]  runs of the trigger event (set)
-- KEYS[4]  the app's active runs per function configuration (hash)
-- KEYS[5]  the worker's unfinished runs (set)
-- KEYS[6]  the function's unfinished runs (zset)
-- KEYS[7]  the parent run's hash (the run's own hash when it has no parent)
-- KEYS[8]  the parent run's children (set; the run's own when it has no parent)
-- KEYS[9]  cancels by id kept for runs not registered yet (hash: run id -> JSON)
-- KEYS[10] when each of those stops counting (zset)
-- KEYS[11] bulk cancels of the run's function, for runs not registered yet (zset: JSON ->
--          when it stops counting, ms)
-- KEYS[11 + 2i - 1], KEYS[11 + 2i]  index set and tombstone of entry i (i = 1 .. n)
-- ARGV[1]  run id
-- ARGV[2]  'function_id:config_hash' (the field counted in KEYS[4])
-- ARGV[3]  worker id
-- ARGV[4]  n
-- ARGV[5]  record retention in seconds (applied to the event-runs set)
-- ARGV[6]  prefix of tombstoned events' JSON
-- ARGV[7]  the parent run's id, or ''
-- ARGV[8 + 2(i-1)], ARGV[9 + 2(i-1)]  entry i: 'm' or 'c' (an expression decides), and
--          its cancel event's name
-- ARGV[8 + 2n]  run hash fields, one JSON object of strings (one argument, not a pair
--          each: every argument costs the caller and Redis); 'trigger_ms' (when the run
--          was triggered, for a trigger that did not come through the stream) is not stored
-- Returns {'registered', hits, bulk, refused} or {'cancelled', reason, cancelled_by}, or
-- {'taken', status} when the id is taken by another run (a trigger delivered twice never
-- starts a second run).
-- hits: {i, cancel event id, its JSON} for each tombstone under an entry with an
-- expression, newer than the trigger; bulk: the JSON of each bulk cancel covering the run
-- whose condition ('if') must hold: the worker evaluates both. refused: the actor of a
-- cancel by id kept for this run that the function's owner refuses, or ''.
-- A retry by the worker that registered the run (its first reply was lost) gets the same
-- answer again: the registration is its own.
local run_id, worker_id, parent_id = ARGV[1], ARGV[3], ARGV[7]
local n = tonumber(ARGV[4])
local retention = ARGV[5]
local now = clock_ms()

-- The tombstones under the run's entries newer than its trigger: for an entry whose key
-- alone decides, the newest id ('m'); for entries with an expression, every one with the
-- event's JSON ('c'), for the worker to evaluate.
local function tombstones(trigger_seq)
  local hits = {}
  for i = 1, n do
    local mode, event_name = ARGV[8 + 2 * (i - 1)], ARGV[9 + 2 * (i - 1)]
    local newest
    for _, cancel_id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[11 + 2 * i], now, '+inf')) do
      if id_after(cancel_id, trigger_seq) then
        if mode == 'm' then
          if not newest or id_after(cancel_id, newest) then
            newest = cancel_id
          end
        else
          local body = redis.call('GET', ARGV[6] .. cancel_id)
          if body then
            hits[#hits + 1] = {i, cancel_id, body}
          end
        end
      end
    end
    if newest then
      return {REASON.tombstone(event_name), newest, newest, id_ms(newest)}, hits
    end
  end
  return nil, hits
end

-- The bulk cancels of the run's function (Client.cancel_many) whose time range holds the
-- run's trigger: the first without a condition cancels it; those with one go to the worker.
local function bulk_cancels(app_id, trigger_seq)
  local at, pending = id_ms(trigger_seq), {}
  for _, body in ipairs(redis.call('ZRANGEBYSCORE', KEYS[11], now, '+inf')) do
    local bulk = cjson.decode(body)
    local after = tonumber(bulk.after)
    local app, condition = bulk.app or '', bulk['if'] or ''
    if (app == '' or app == app_id) and at <= tonumber(bulk.before)
      and (not after or at >= after) then
      if condition == '' then
        return {bulk.reason, BY.api, '', now}, {}
      end
      pending[#pending + 1] = body
    end
  end
  return nil, pending
end

local existing = redis.call('HMGET', KEYS[1], 'status', 'worker_id', 'cancel_reason',
  'cancelled_by', 'trigger_seq', 'app_id')
if existing[1] then
  if existing[2] == worker_id and existing[1] == 'running' then
    -- A retry: its first reply was lost, or the worker failed before it could evaluate
    -- the expression tombstones and bulk conditions; they are reported again.
    local _, hits = tombstones(existing[5])
    local _, bulk = bulk_cancels(existing[6], existing[5])
    return {'registered', hits, bulk, ''}
  elseif existing[2] == worker_id and existing[1] == 'cancelling' then
    return {'cancelled', existing[3] or '', existing[4] or ''}
  end
  return {'taken', existing[1]}
end

local fields = {'status', 'running', 'started_at', ms(now)}
local given = cjson.decode(ARGV[8 + 2 * n])
for field, value in pairs(given) do
  if field ~= 'trigger_ms' then
    fields[#fields + 1] = field
    fields[#fields + 1] = value
  end
end
local event_id, trigger_ms = given.event_id, tonumber(given.trigger_ms)
-- Where the run stands in the order of events: its trigger's stream id; for a run whose
-- trigger did not come through the stream, when it was triggered (trigger_ms, a job's
-- enqueue time: a cancel published while it was queued still applies), never later than
-- now; else the moment it registered.
local trigger_seq = ms(now) .. '-0'
if event_id and string.match(event_id, '^%d+%-%d+') then
  trigger_seq = event_id
elseif trigger_ms and trigger_ms < now then
  trigger_seq = ms(trigger_ms) .. '-0'
end
fields[#fields + 1] = 'trigger_seq'
fields[#fields + 1] = trigger_seq
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], now, run_id)
redis.call('SADD', KEYS[3], run_id)
redis.call('EXPIRE', KEYS[3], retention)
redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
redis.call('SADD', KEYS[5], run_id)
-- By when it was triggered, not when it registered: a bulk cancel's time range counts a run
-- that waited in the queue by its trigger, whether it registered before the cancel or not.
redis.call('ZADD', KEYS[6], id_ms(trigger_seq), run_id)
for i = 1, n do
  redis.call('SADD', KEYS[10 + 2 * i], run_id)
end

local cancel
if parent_id ~= '' then
  redis.call('SADD', KEYS[8], run_id)
  local parent_status = redis.call('HGET', KEYS[7], 'status')
  if parent_status ~= 'running' and parent_status ~= 'cancelling' then
    -- The parent is over (or unknown: its record expired, or never was): nothing will
    -- cascade from it any more, and nothing would expire the set when it ends.
    redis.call('EXPIRE', KEYS[8], retention)
  end
  if parent_status == 'cancelling' or parent_status == 'cancelled' then
    cancel = {REASON.parent(parent_id), BY.parent(parent_id), '', now}
  end
end

-- A cancel by this run's id that came first: applied now, unless the function's owner
-- refuses its actor (said in the reply: the worker logs it). Taken either way.
local refused = ''
local kept = redis.call('HGET', KEYS[9], run_id)
if kept then
  redis.call('HDEL', KEYS[9], run_id)
  redis.call('ZREM', KEYS[10], run_id)
  kept = cjson.decode(kept)
  local actor = kept.actor or ''
  if cancel or tonumber(kept['until']) < now then
    kept = nil
  elseif given.owned == '1' and actor ~= '*' and (actor == '' or actor ~= given.owner) then
    refused, kept = actor == '' and '(none)' or actor, nil
  end
end
if not cancel and kept then
  cancel = {kept.reason, BY.api, '', now}
end

local hits, bulk = {}, {}
if not cancel then
  cancel, bulk = bulk_cancels(given.app_id, trigger_seq)
end
if not cancel then
  cancel, hits = tombstones(trigger_seq)
end

if cancel then
  mark_cancelling(KEYS[1], cancel[1], cancel[2], cancel[3], now, cancel[4])
  return {'cancelled', cancel[1], cancel[2]}
end
return {'registered', hits, bulk, refused}
