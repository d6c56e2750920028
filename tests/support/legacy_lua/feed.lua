-- Revocation feed (prepended to the revoking scripts). `emit` appends an event to the
-- revocation stream inside the revoking script, so on a single Redis or a Sentinel group
-- the event is written atomically with the revocation. On Redis Cluster the stream lives
-- in another slot: scripts get no stream (stream == nil) and the service appends the
-- events itself right after (see tokensvc.store). Entries older than `minid` are trimmed:
-- they cover only tokens that have expired.
local function emit(stream, minid, kind, value, exp, before)
  if not stream then return end
  redis.call('XADD', stream, 'MINID', '~', minid, '*',
    'kind', kind, 'value', value, 'exp', exp, 'before', before or '0')
end
