-- Take the event for one worker run. Returns {state, lease ms left, losses, record...}:
-- state is the event's status, 'missing', or 'busy' when another run holds the lease.
-- A run that finds ``claimed`` still set knows the previous run died without finishing.
local function claim_event(event, lease, watch, token, lease_ms)
  local status = redis.call('HGET', event, 'status')
  if not status then return {'missing', 0, 0} end
  if status == 'delivered' or status == 'rate_limited' or status == 'dead_lettered'
      or status == 'suppressed' or status == 'bounced' then
    return {status, 0, 0}
  end
  if not redis.call('SET', lease, token, 'NX', 'PX', lease_ms) then
    return {'busy', redis.call('PTTL', lease), 0}
  end
  -- The run that holds the event, kept in the record (the lease expires, and the next
  -- run deletes it when done): what fences every write of a run (_FENCE_LUA).
  redis.call('HSET', event, 'run', token)
  redis.call('ZADD', watch, redis.call('TIME')[1], string.sub(event, 7))
  local losses = 0
  if redis.call('HGET', event, 'claimed') == '1' then
    losses = redis.call('HINCRBY', event, 'losses', 1)
  else
    redis.call('HSET', event, 'claimed', '1')
  end
  local result = {status, 0, losses}
  for _, v in ipairs(redis.call('HGETALL', event)) do table.insert(result, v) end
  return result
end
