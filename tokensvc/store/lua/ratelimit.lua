-- One rate-limited event. KEYS[1] limiter key. ARGV: interval µs, tolerance µs.
-- Returns 0 or the ms to wait (gcra.lua is prepended).
return gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
