-- Declare where one function's events go among the namespace's partitions (at sync).
-- A run lives in the partition of its trigger's value at the trigger name's placement
-- path; a cancel event goes to the partition of its own value at its name's placement
-- path. A cancel event is looked up in its own partition alone when, for every rule on
-- it, the rule's match path is the placement path of both the cancel event and the
-- rule's trigger: equal values then share a partition. Any other rule (an expression
-- without a path, a path that differs) makes the cancel event 'broadcast': the broker
-- looks it up in every partition. A placement path, once set, never changes (publishers
-- cache it), and a broadcast never goes back: both only ever keep old events reachable.
-- KEYS[1]  placements (hash): '{place}{name}' -> path, '{broadcast}{name}' -> '1'
-- ARGV[1]  the field prefix of placement paths (sdk/keys.py PLACEMENT_PATH)
-- ARGV[2]  the field prefix of broadcast cancel events (sdk/keys.py PLACEMENT_BROADCAST)
-- ARGV[3]  the trigger's name
-- ARGV[4]  the function's first match path, or ''
-- ARGV[5 ..]  cancel event name, match path ('' for none) pairs, one per rule
-- Returns the cancel event names that are broadcast.
local place, broadcast_prefix = ARGV[1], ARGV[2]
local trigger, first = ARGV[3], ARGV[4]

local function placement(name, path)
  local placed = redis.call('HGET', KEYS[1], place .. name)
  if not placed and path ~= '' then
    redis.call('HSET', KEYS[1], place .. name, path)
    placed = path
  end
  return placed
end

local trigger_path = placement(trigger, first)
local broadcast = {}
for i = 5, #ARGV, 2 do
  local name, path = ARGV[i], ARGV[i + 1]
  local cancel_path = placement(name, path)
  if path == '' or path ~= trigger_path or path ~= cancel_path then
    redis.call('HSET', KEYS[1], broadcast_prefix .. name, '1')
  end
  if redis.call('HEXISTS', KEYS[1], broadcast_prefix .. name) == 1 then
    broadcast[#broadcast + 1] = name
  end
end
return broadcast
