-- GCRA (generic cell rate algorithm), prepended to the scripts that rate-limit.
-- A key holds the theoretical arrival time (TAT, ms, Redis clock). With interval =
-- period / count and tolerance = period, a burst of `count` calls passes, then one per
-- interval. Returns 0 (allowed, TAT advanced) or the ms to wait (nothing changed).
local function gcra(key, interval, tolerance)
  if interval <= 0 then return 0 end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local tat = math.max(tonumber(redis.call('GET', key) or now), now)
  local new_tat = tat + interval
  local wait = new_tat - tolerance - now
  if wait > 0 then return math.ceil(wait) end
  redis.call('SET', key, new_tat, 'PX', math.max(1, math.ceil(new_tat - now)))
  return 0
end
