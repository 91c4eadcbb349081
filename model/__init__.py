"""SR-3D model core: computes, never talks (no HTTP, no Redis)."""
