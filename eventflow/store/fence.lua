-- Fencing: a run writes only while the record names it as the run holding the event
-- (set by the claim). A run whose lease ran out while it was cut off, and whose event a
-- newer run took, changes nothing when its write arrives late but the history, where its
-- ``superseded`` entry tells what it saw. An empty token (a caller outside a run) and a
-- record no run has claimed since this field exists are not fenced.
local function fenced(event, history, token, superseded)
  local holder = redis.call('HGET', event, 'run')
  if token == '' or not holder or holder == token then return true end
  redis.call('RPUSH', history, superseded)
  return false
end
