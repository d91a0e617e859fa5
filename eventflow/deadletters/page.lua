-- The next ``count`` ids of the queue, newest first, strictly after the cursor, among
-- those that failed from ARGV[2] to ARGV[1] (ms, inclusive; '-inf', '+inf': unbounded).
-- The order is (failed_at, id), both descending: the order of ZREVRANGE, whose members of
-- equal score come by their bytes, highest first. A cursor (score ARGV[3], id ARGV[4];
-- ARGV[3] empty: from the top) is a position in that order, found by counting and by a
-- binary search among the letters of its millisecond, so it holds whether or not its own
-- letter is still there, and letters added or removed between two pages neither repeat
-- nor hide others. Each call is O(log(n)^2 + count), however deep the page.
-- ARGV: max score, min score, cursor score, cursor id, count. Returns {id, score, ...}.
local key = KEYS[1]
local function before(a, b)  -- a < b byte by byte, as Redis orders members
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local start = 0
if ARGV[1] ~= '+inf' then start = redis.call('ZCOUNT', key, '(' .. ARGV[1], '+inf') end
if ARGV[3] ~= '' then
  local lo = redis.call('ZCOUNT', key, '(' .. ARGV[3], '+inf')
  local hi = lo + redis.call('ZCOUNT', key, ARGV[3], ARGV[3])
  -- Among the letters of the cursor's millisecond (ranks lo .. hi - 1, ids descending),
  -- the first one whose id sorts before the cursor's.
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if before(redis.call('ZREVRANGE', key, mid, mid)[1], ARGV[4]) then hi = mid
    else lo = mid + 1 end
  end
  if lo > start then start = lo end
end
local stop = start + tonumber(ARGV[5]) - 1
if ARGV[2] ~= '-inf' then
  local last = redis.call('ZCOUNT', key, ARGV[2], '+inf') - 1
  if last < stop then stop = last end
end
if stop < start then return {} end
return redis.call('ZREVRANGE', key, start, stop, 'WITHSCORES')
