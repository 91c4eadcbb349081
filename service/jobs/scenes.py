"""A job's compact 3D scene for the page (`keys.scene_key`, bytes from model/geometry/scene_export.py):
stored by the worker once the point maps exist, read by GET /v1/spatial-qa/{id}/scene. It expires
job_max_age_s after it is stored, and scene_ttl_s (<= job_ttl_s) after the job ends (the terminal
writer shortens it)."""
from __future__ import annotations

import redis.asyncio as aioredis
from redis.client import NEVER_DECODE

from service.blobs import check_redis_room
from service.keys import scene_key
from service.settings import StoreSettings

# Scenes may fill the blob store up to this share of the uploads' high-water mark.
SCENE_SHARE = 0.5


class SceneStore:
    def __init__(self, redis: aioredis.Redis, settings: StoreSettings) -> None:
        self.redis = redis
        self.settings = settings

    async def put(self, job_id: str, data: bytes) -> None:
        """Only below the blob store's high-water mark (BlobStoreFull otherwise: the pipeline logs it
        and the job goes on without a scene): a scene is ~1 MB, and 60 of them kept for the job TTL
        filled a 40 MB store past the mark. Scenes stop at half the uploads' mark (SCENE_SHARE): they
        are a convenience for the page, uploads are the service, and at the same mark a burst of a few
        hundred jobs filled the store with scenes until uploads got 503 upload_store_full."""
        await check_redis_room(self.redis, len(data), self.settings.blob_redis_high_water * SCENE_SHARE)
        await self.redis.set(scene_key(job_id), data, ex=self.settings.job_max_age_s)

    async def get(self, job_id: str) -> bytes | None:
        """The scene's bytes, or None before the point maps exist (or after expiry)."""
        # The shared client decodes replies to str; this one reply stays bytes.
        return await self.redis.execute_command("GET", scene_key(job_id), **{NEVER_DECODE: True})
