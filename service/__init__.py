"""SR-3D service: talks (HTTP, Redis, media); never does tensor math."""
