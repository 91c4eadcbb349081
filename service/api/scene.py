"""GET /v1/spatial-qa/{id}/scene: the job's compact 3D scene (binary, see model/geometry/scene_export.py).

Owner-only like the other job routes; the worker stores the bytes once the point maps exist (the
`progress` event of stage `pointmaps` then carries `"scene": true`) and they expire with the job.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from service.errors import ApiError
from service.api.deps import Caller, GatewayState, authenticate, owned_job, state
from service.api.errors import ERROR_RESPONSES

SCENE_MEDIA_TYPE = "application/vnd.sr3d.scene"

router = APIRouter(prefix="/v1", tags=["spatial-qa"])


@router.get(
    "/spatial-qa/{job_id}/scene",
    response_class=Response,
    responses={**ERROR_RESPONSES, 200: {"content": {SCENE_MEDIA_TYPE: {}},
                                        "description": "little-endian scene: header, cameras, points, colours, region ids"}},
    summary="The job's 3D scene (subsampled point cloud, regions, cameras)",
)
async def job_scene(job_id: str, caller: Caller = Depends(authenticate), gw: GatewayState = Depends(state)) -> Response:
    view = await owned_job(gw, job_id, caller)
    data = await gw.jobs.scenes.get(job_id)
    if data is None:
        raise ApiError("scene_not_ready", f"job {job_id} ({view.status.value}) has no scene yet: it is stored "
                       "once the point maps exist (progress `pointmaps` with `scene: true`)")
    # private: the scene is the owner's; immutable once written, so the tab may keep it.
    return Response(data, media_type=SCENE_MEDIA_TYPE, headers={"Cache-Control": "private, max-age=3600"})
