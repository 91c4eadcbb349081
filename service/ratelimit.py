"""Per-key token-bucket rate limit in Redis (one Lua call per request, shared by all gateway replicas).

Bucket `sr3d:rl:{key_id}` = hash {tokens, ts}; refills at rate_per_min/60 tokens per second up to
`burst`. Time comes from the Redis server (TIME), so replicas with skewed clocks agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import redis.asyncio as aioredis

from service.keys import rate_key

_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {allowed, tostring(wait)}
"""


@dataclass
class RateDecision:
    allowed: bool
    retry_after_s: int  # whole seconds until one token is back (for Retry-After)


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, per_minute: float, burst: int = 0) -> None:
        """per_minute <= 0 disables the limit; burst 0 = one minute's worth."""
        self.redis = redis
        self.rate = per_minute / 60.0
        self.burst = burst or max(1, int(math.ceil(per_minute)))
        self._script = redis.register_script(_BUCKET)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    async def hit(self, key_id: str) -> RateDecision:
        """Take one token from `key_id`'s bucket."""
        if not self.enabled:
            return RateDecision(True, 0)
        allowed, wait = await self._script(keys=[rate_key(key_id)], args=[self.rate, self.burst])
        return RateDecision(bool(int(allowed)), max(1, math.ceil(float(wait))) if not int(allowed) else 0)
