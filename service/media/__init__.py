"""Untrusted uploads -> pixels: probe, sample and decode videos, decode images, rasterise region masks.

Everything here runs on client-supplied bytes, so every cap is checked *before* the expensive step:
file size before opening, container magic before FFmpeg sees the file, resolution / duration / frame
count from headers (and a cheap packet scan) before any frame is decoded, image pixel count from the
PNG/JPEG header before Pillow allocates.

One module per job (this package imports none of them, so the gateway's `sniff` comes without PyAV):
  limits.py        `MediaError` (every refusal) and `MediaLimits` (the caps), `scaled_size` (the `max_side` rule)
  sniff.py         container family from an upload's first bytes (the gateway's rule too)
  probe.py         file and container checks, `probe_video` (headers + a packet scan, at most one frame decoded)
  sampling.py      which frames: uniform in time plus the frames regions were drawn on
  frames.py        decodes the sampled frames in this process, seeking to keyframes
  decode_child.py  `decode_video`: the same decode in a killable child process
  images.py        PNG/JPEG -> pixels, `image_size`
  masks.py         region mask PNGs and boxes -> bool masks on the displayed frame

Time limit (both layers):
1. `decode_video` runs the decode in a child process (multiprocessing *forkserver*: safe when the
   parent has CUDA/torch threads, cheap per call once the server is up). The parent waits on a pipe
   with the deadline and kills the child if it passes, so even a single packet that makes FFmpeg
   spin forever cannot hold the worker.
2. Inside the decode loop the deadline is also checked between packets, so an ordinary slow file
   stops cooperatively with the same error and the child exits cleanly.

Coordinate convention: frames are returned *displayed* (container rotation applied). Boxes and mask
PNGs are in displayed-frame pixels too (`rotation=0`, the default). A client that drew on the coded,
unrotated frame passes the stream's rotation and the mask is rotated like the frames.

Error codes (`MediaError.code`; service/api/errors.py maps each to its HTTP status):
  malformed:    invalid_argument, invalid_box
  over a cap:   file_too_large, resolution_too_large, aspect_ratio_too_large, too_long
  unsupported:  unsupported_container, unsupported_codec, unsupported_image_format, no_video_stream
  undecodable:  corrupt_media, decode_timeout, too_many_frames, frame_out_of_range,
                mask_size_mismatch, invalid_mask, box_out_of_frame, empty_box
"""
