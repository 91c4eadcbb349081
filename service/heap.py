"""Short full garbage collections in the long-running serving processes.

A full (generation 2) collection walks every tracked object and holds the event loop for the whole
walk. After start-up most of those objects are the imported modules, FastAPI's routes and schemas, or
(in a worker) torch and the engine, none of which ever become garbage: in the gateway a full
collection walked ~90 k of them and took 50-75 ms, and a tenant sending many requests triggers one
every ~10 s, stalling every other tenant's requests for that long (loadtests/RESULTS.md, "Two tenants,
one attacking"). `gc.freeze()` moves everything alive at that point to the permanent generation, so
later collections walk only what was allocated since. The cost is that start-up objects that become
garbage in cycles later are never freed: start-up objects live as long as the process. So it is the
serving commands that freeze (`sr3d gateway`, `sr3d serve`, `sr3d worker`), not `create_app`: a
process that embeds the app (tests start hundreds) keeps collecting as usual.
"""
from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect once (no start-up garbage kept forever), then exempt every surviving object from collections."""
    gc.collect()
    gc.freeze()
