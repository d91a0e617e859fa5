-- Store a batch of events at once, each with its first history entry and its Celery
-- message, and the answer to the batch's Idempotency-Key with them, unless that key was
-- used before: then store nothing and return the first answer. KEYS: stats, queue, watch,
-- the Idempotency-Key ('' for none), then the record and history keys of each event.
-- ARGV: producer, time, history entry, the answer to remember ('' for none), then 5
-- values per event: id, user id, event type, payload (JSON) and message.
-- Returns {how many were stored, first answer or ''}.
--
-- Run twice (a reply lost, the call sent again): the ids are chosen once per call, so
-- an existing first record, or a remembered answer equal to this call's own, is this
-- call's first run; the second run changes nothing and answers as the first did.
local producer, now, entry, answer = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local total = (#ARGV - 4) / 5
-- An answer given before is written again, unchanged: a WAIT after this call (with
-- EVENTFLOW_REDIS_MIN_REPLICAS) then also covers the first run's writes.
if KEYS[4] ~= '' then
  local prior = redis.call('GET', KEYS[4])
  if prior then redis.call('SET', KEYS[4], prior, 'KEEPTTL') end
  if prior == answer then return {total, ''} end
  if prior then return {0, prior} end
end
if total > 0 and redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('HSET', KEYS[5], 'id', ARGV[5])
  return {total, ''}
end
local watched = tonumber(redis.call('TIME')[1])
local count = 0
local messages, watch = {}, {}
for i = 5, #ARGV, 5 do
  local id = ARGV[i]
  local k = 5 + 2 * count
  redis.call('HSET', KEYS[k], 'id', id, 'user_id', ARGV[i + 1],
             'event_type', ARGV[i + 2], 'payload', ARGV[i + 3], 'producer', producer,
             'status', 'queued', 'attempts', '0', 'created_at', now, 'updated_at', now)
  redis.call('RPUSH', KEYS[k + 1], entry)
  count = count + 1
  messages[count] = ARGV[i + 4]
  watch[2 * count - 1] = watched
  watch[2 * count] = id
end
if count > 0 then
  -- One call each for all the messages (in the order of as many LPUSHes) and watch entries.
  redis.call('LPUSH', KEYS[2], unpack(messages))
  redis.call('ZADD', KEYS[3], unpack(watch))
  redis.call('HINCRBY', KEYS[1], 'accepted', count)
end
if KEYS[4] ~= '' then
  redis.call('SET', KEYS[4], answer, 'EX', IDEMPOTENCY_SECONDS)
end
return {count, ''}
