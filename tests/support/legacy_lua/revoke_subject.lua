-- Revoke everything of a subject, and optionally lock it. KEYS[1] subject hash,
-- KEYS[2] session index, KEYS[3..] the subject's family hashes (read from the index just
-- before), [last: the revocation stream when ARGV[5] == '1']. The watermark alone revokes every family created up to now (Refresh and
-- Introspect compare a family's creation time with it), so a family created between
-- reading the index and this script is covered too; marking the listed families only
-- makes session listings exact. ARGV: now ms (caller's clock, for the families'
-- revoked_at), reason, watermark ttl ms, '1' to lock (Issue refuses a locked subject),
-- '1' if the last KEY is the revocation stream, stream MINID, event expiry ms, subject.
-- Returns {watermark ms, session ids revoked...}. (feed.lua is prepended.)
-- The watermark itself is Redis's clock, as is each family's 'created' (issue.lua), so
-- replicas' clock skew cannot misorder them. A locked subject's hash never expires.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old = tonumber(redis.call('HGET', KEYS[1], 'revoked_before') or '0')
redis.call('HSET', KEYS[1], 'revoked_before', math.max(old, now))
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'locked', now, 'lock_reason', ARGV[2])
end
if redis.call('HEXISTS', KEYS[1], 'locked') == 1 then
  redis.call('PERSIST', KEYS[1])
else
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
end
local stream = ARGV[5] == '1' and KEYS[#KEYS] or nil
local out = {math.max(old, now)}
for i = 3, stream and #KEYS - 1 or #KEYS do
  if redis.call('HGET', KEYS[i], 'state') == 'active' then
    redis.call('HSET', KEYS[i], 'state', 'revoked', 'revoked_at', now, 'reason', ARGV[2])
    local sid = string.match(KEYS[i], ':fam:(%x+)$')
    out[#out + 1] = sid
    emit(stream, ARGV[6], 'session', sid, ARGV[7])
  end
end
emit(stream, ARGV[6], 'subject', ARGV[8], ARGV[7], out[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
return out
