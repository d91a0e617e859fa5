-- Count the request against the producer's API rate limit (KEYS[7], '' for none: then
-- nothing is counted nor read); if allowed, read the
-- user's quota (KEYS[8]) and store the event, its first history entry and its Celery
-- message at once, unless the Idempotency-Key (KEYS[5], may be empty) has already been
-- used: then return the first answer instead. A refused request stores nothing.
-- ARGV: history entry, message, API limit, API window ms, quota window ms, quota limit,
-- the answer to remember around the quota left (prefix, suffix), then the event's id,
-- user id, event type, payload (JSON), producer and time (the fields of accept_fields).
-- Returns {allowed, remaining, reset ms, retry-after ms, quota used, first answer or ''}.
--
-- Run twice (the client sends it again when the connection broke after it went out):
-- the event's id is chosen once per call, so a record that exists is this call's own,
-- stored by the first run and perhaps already delivered since. The second run changes
-- nothing and counts nothing; it answers as the first did, the rate-limit figures read
-- without counting the request again.
local function gcra_peek(key, limit, window)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local remaining = math.floor((window - (tat - now)) / (window / limit) + 0.000001)
  return 1, remaining, math.ceil(tat - now), 0, now
end
local again = redis.call('EXISTS', KEYS[1]) == 1
local allowed, remaining, reset, retry, now, used = 1, 0, 0, 0, 0, 0
if KEYS[7] ~= '' then
  local count = gcra
  if again then count = gcra_peek end
  allowed, remaining, reset, retry, now = count(KEYS[7], tonumber(ARGV[3]), tonumber(ARGV[4]))
  if allowed == 0 then return {0, remaining, reset, retry, 0, ''} end
  used = redis.call('ZCOUNT', KEYS[8], now - tonumber(ARGV[5]), '+inf')
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000
end
local verdict = {1, remaining, reset, retry, used, ''}
if again then
  -- Written again, unchanged: a WAIT after this call then also covers the first run.
  redis.call('HSET', KEYS[1], 'id', ARGV[9])
  return verdict
end
if KEYS[5] ~= '' then
  local prior = redis.call('GET', KEYS[5])
  if prior then
    -- Written again, unchanged: a WAIT after this call then also covers the first write.
    redis.call('SET', KEYS[5], prior, 'KEEPTTL')
    verdict[6] = prior
    return verdict
  end
end
redis.call('HSET', KEYS[1], 'id', ARGV[9], 'user_id', ARGV[10], 'event_type', ARGV[11],
           'payload', ARGV[12], 'producer', ARGV[13], 'status', 'queued', 'attempts', '0',
           'created_at', ARGV[14], 'updated_at', ARGV[14])
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'accepted', 1)
redis.call('LPUSH', KEYS[4], ARGV[2])
if KEYS[5] ~= '' then
  local left = math.max(tonumber(ARGV[6]) - used, 0)
  redis.call('SET', KEYS[5], ARGV[7] .. string.format('%d', left) .. ARGV[8],
             'EX', IDEMPOTENCY_SECONDS)
end
redis.call('ZADD', KEYS[6], math.floor(now / 1000), string.sub(KEYS[1], 7))
return verdict
