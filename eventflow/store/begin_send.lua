-- Mark the send as started in the ledger before talking SMTP. If the previous run had
-- started a send and never recorded its outcome, this send may be a second one: count it.
-- Argument: now. Returns {attempt number, ambiguous}.
local function begin_send(event, stats, now)
  local ambiguous = 0
  if redis.call('HGET', event, 'send') == 'started' then
    ambiguous = 1
    redis.call('HINCRBY', stats, 'ambiguous', 1)
  end
  redis.call('HSET', event, 'send', 'started', 'status', 'sending', 'updated_at', now)
  local attempt = redis.call('HINCRBY', event, 'attempts', 1)
  return {attempt, ambiguous}
end
