sr3d bench measure --repeats 20 --out bench-out/measure   # dev box (2 cores, 1 pinned), quiet
