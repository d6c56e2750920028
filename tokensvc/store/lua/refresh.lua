-- Rotate a refresh token (families v2, see tokensvc.store.families). One atomic step.
-- KEYS[1] family hash   KEYS[2] subject hash (revoked_before watermark)
-- [KEYS[3] revocation stream: reuse revokes the family and tells the interceptors]
-- ARGV: 1 presented hash, 2 presented generation (0: a v1 token), 3 '1' if the presented
--   token's MAC is valid (the service issued it), 4 successor hash, 5 successor generation,
--   6 sealed successor ('' with no grace window), 7 idle ttl ms, 8 presenter's certificate
--   thumbprint ('' without one), 9 grace window ms (0: strict), 10 stream MINID,
--   11 event expiry ms, 12 session id, 13 the family end (s) written in the successor.
--   (feed.lua is prepended.)
-- Returns {status, ...}:
--   {'ok', claims, family expiry, successor expiry, now} |
--   {'replayed', claims, family expiry, successor expiry, now, sealed, generation} |
--   {'regen', generation, family expiry} (the successor must be of generation+1 and carry
--   the family's end: mint it again) |
--   {'reuse', claims} | {'revoked'} | {'expired'} | {'unknown'} | {'mismatch'}
-- (claims: the JSON carried to every access token, with the subject and client_id)
-- Times are Redis's clock (TIME), the same clock as 'created' and the subject watermark,
-- and the service stamps the access token's iat with the returned 'now'.
-- A token is this family's if it is the current one (cur), or an older generation whose
-- MAC is valid, or a v1 token recorded as used (u:<hash>, families from before v2). A
-- family bound to a certificate (RFC 8705) is served only to that certificate: any other
-- presenter is refused before anything changes (no rotation, replay or reuse verdict).
local fam, subj = KEYS[1], KEYS[2]
local presented, pgen = ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local f = redis.call('HMGET', fam, 'state', 'cur', 'cur_exp', 'exp', 'created', 'claims',
  'cnf', 'gen', 'last', 'g')
local state, cur = f[1], f[2]
if not state then return {'unknown'} end
local gen = tonumber(f[8] or '0')
local is_cur = cur == presented
local is_old = not is_cur and (
  (ARGV[3] == '1' and pgen <= gen) or
  (pgen == 0 and redis.call('HEXISTS', fam, 'u:' .. presented) == 1))
if not is_cur and not is_old then return {'unknown'} end
if f[7] and f[7] ~= '' and f[7] ~= ARGV[8] then return {'mismatch'} end
if state ~= 'active' then return {'revoked'} end
local wm = redis.call('HGET', subj, 'revoked_before')
if wm and tonumber(f[5]) <= tonumber(wm) then
  redis.call('HSET', fam, 'state', 'revoked', 'revoked_at', now, 'reason', 'subject')
  return {'revoked'}
end
local fam_exp = tonumber(f[4])
if is_old then
  -- the grace window: the immediately previous token, soon after its rotation, while its
  -- successor is still current (unused), gets that same successor back. The grace record
  -- 'g' is '<rotation ms> <first 128 bits of the previous token's hash> <sealed
  -- successor>', written by the last rotation; 'last' equal to its time proves no
  -- rotation (of any version) came after.
  local grace, g, last = tonumber(ARGV[9]), f[10], f[9]
  local head = last and (last .. ' ' .. string.sub(presented, 1, 32) .. ' ')
  if grace > 0 and g and head and string.sub(g, 1, #head) == head
      and now < tonumber(last) + grace and now < tonumber(f[3]) and now < fam_exp then
    return {'replayed', f[6], fam_exp, tonumber(f[3]), math.max(now, tonumber(f[5])),
      string.sub(g, #head + 1), gen}
  end
  redis.call('HSET', fam, 'state', 'revoked', 'revoked_at', now, 'reason', 'reuse')
  emit(KEYS[3], ARGV[10], 'session', ARGV[12], ARGV[11])
  return {'reuse', f[6]}
end
if now >= tonumber(f[3]) or now >= fam_exp then return {'expired'} end
if tonumber(ARGV[5]) ~= gen + 1 or tonumber(ARGV[13]) ~= math.floor(fam_exp / 1000) then
  return {'regen', gen, fam_exp}
end
local next_exp = math.min(now + tonumber(ARGV[7]), fam_exp)
redis.call('HSET', fam, 'cur', ARGV[4], 'gen', ARGV[5], 'cur_exp', next_exp, 'last', now)
if pgen == 0 then
  -- a v1 token leaves the family: it stays recognisable as used (once per v1 family)
  redis.call('HSET', fam, 'u:' .. presented, now)
end
if ARGV[6] ~= '' then
  redis.call('HSET', fam, 'g', now .. ' ' .. string.sub(presented, 1, 32) .. ' ' .. ARGV[6])
elseif f[10] then
  redis.call('HDEL', fam, 'g')
end
-- the access token is dated no earlier than the family (issue.lua may date it ahead by
-- under a second, past its subject's watermark)
return {'ok', f[6], fam_exp, next_exp, math.max(now, tonumber(f[5]))}
