-- Rotate a refresh token. One atomic step: the presented token must be the family's
-- current one; it is marked used (never deleted: it is the evidence for reuse detection)
-- and its successor becomes current. A used token revokes the whole family.
-- KEYS[1] family hash   KEYS[2] subject hash (revoked_before watermark)
-- [KEYS[3] revocation stream: reuse revokes the family and tells the interceptors]
-- ARGV: presented hash, successor hash, now ms, idle ttl ms, presenter's certificate
--       thumbprint ('' without a client certificate), stream MINID, event expiry ms,
--       session id. (feed.lua is prepended.)
-- Returns {status, ...}: {'ok', claims, sub, cid, family expiry, successor expiry} |
--   {'reuse', sub} | {'revoked'} | {'expired'} | {'unknown'} | {'mismatch'}
-- A family bound to a certificate (RFC 8705) is only served to that certificate: any
-- other presenter is refused before anything changes (no rotation, no reuse verdict).
local fam, subj = KEYS[1], KEYS[2]
local presented, successor = ARGV[1], ARGV[2]
local now, idle = tonumber(ARGV[3]), tonumber(ARGV[4])
local f = redis.call('HMGET', fam, 'state', 'cur', 'cur_exp', 'exp', 'created', 'sub', 'cid', 'claims', 'cnf')
local state, cur = f[1], f[2]
if not state then return {'unknown'} end
local is_used = redis.call('HEXISTS', fam, 'u:' .. presented) == 1
if cur ~= presented and not is_used then return {'unknown'} end
if f[9] and f[9] ~= '' and f[9] ~= ARGV[5] then return {'mismatch'} end
if state ~= 'active' then return {'revoked'} end
local wm = redis.call('HGET', subj, 'revoked_before')
if wm and tonumber(f[5]) <= tonumber(wm) then
  redis.call('HSET', fam, 'state', 'revoked', 'revoked_at', now, 'reason', 'subject')
  return {'revoked'}
end
if is_used then
  redis.call('HSET', fam, 'state', 'revoked', 'revoked_at', now, 'reason', 'reuse')
  emit(KEYS[3], ARGV[6], 'session', ARGV[8], ARGV[7])
  return {'reuse', f[6]}
end
local fam_exp = tonumber(f[4])
if now >= tonumber(f[3]) or now >= fam_exp then return {'expired'} end
local next_exp = math.min(now + idle, fam_exp)
redis.call('HSET', fam, 'u:' .. presented, now, 'cur', successor, 'cur_exp', next_exp, 'last', now)
return {'ok', f[8], f[6], f[7], fam_exp, next_exp}
