-- A worker run's whole start in one round trip: claim the event; note a lost previous run
-- (and stop there when the event has lost too many); reserve its quota (and stop there
-- when refused); stop when the address is on the suppression list (before the quota, so a
-- suppressed event takes no unit of it); begin the send in the ledger, noting an ambiguous one. The same steps,
-- in the same order, as the functions above. The quota key is the record's
-- user's, known only here (a single Redis, not a cluster: any key may be named).
-- KEYS: event, lease, watch, stats, history. ARGV: token, lease ms, quota window ms,
-- quota limit, event id, now, most worker losses.
-- Returns {state, lease ms left, losses, step reached ('lost', 'failed', 'suppressed',
-- 'refused' or 'send'),
-- attempt, ambiguous, record as claimed...}; only the first three when it was not taken.
--
-- Run twice (a reply lost, the call sent again): the token is the call's own, and the
-- record's ``take`` field keeps it with the first run's answer, so the second run finds
-- its own claim (not a lease held by "another" run), counts nothing again and returns
-- that answer, with the record as it is now. A run that did not take the event changed
-- nothing, and a second run finds the same.
local taken = redis.call('HGET', KEYS[1], 'take')
if taken and string.sub(taken, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
  local reply = cjson.decode(string.sub(taken, #ARGV[1] + 2))
  for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do table.insert(reply, v) end
  return reply
end
local claim = claim_event(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
if #claim <= 3 then return claim end
local losses = claim[3]
local record = {}
for i = 4, #claim, 2 do record[claim[i]] = claim[i + 1] end
local function note(step, name, value)
  redis.call('RPUSH', KEYS[5], '{"step":"' .. step .. '","at":"' .. ARGV[6] .. '","'
             .. name .. '":' .. string.format('%d', value) .. '}')
end
local reply = {claim[1], claim[2], losses, 'send', 0, 0}
if losses > 0 then
  note('worker_lost', 'losses', losses)
  if losses >= tonumber(ARGV[7]) then reply[4] = 'lost' end
end
-- Failed for good, its dead letter not written yet: no send, the run writes it.
if reply[4] == 'send' and record['failed_as'] then reply[4] = 'failed' end
if reply[4] == 'send' then
  -- The payload's address is email-validator's normalised form, ASCII only: lower-cased,
  -- it is the suppression entry's key (eventflow/suppressions: suppression_key).
  local ok, payload = pcall(cjson.decode, record['payload'] or '')
  if ok and type(payload) == 'table' and type(payload['to_email']) == 'string'
      and redis.call('EXISTS', 'ef:sup:' .. string.lower(payload['to_email'])) == 1 then
    reply[4] = 'suppressed'
  end
end
if reply[4] == 'send' then
  local quota = reserve_quota(KEYS[1], 'ef:quota:' .. (record['user_id'] or ''), ARGV[3],
                              ARGV[4], ARGV[5])
  if quota[1] == 0 then reply[4] = 'refused' end
end
if reply[4] == 'send' then
  local started = begin_send(KEYS[1], KEYS[4], ARGV[6])
  reply[5], reply[6] = started[1], started[2]
  if started[2] == 1 then note('ambiguous_resend', 'attempt', started[1]) end
end
redis.call('HSET', KEYS[1], 'take', ARGV[1] .. ' ' .. cjson.encode(reply))
for i = 4, #claim do table.insert(reply, claim[i]) end
return reply
