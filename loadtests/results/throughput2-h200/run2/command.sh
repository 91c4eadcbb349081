# depth streams and MPS, two single-GPU pipeline benches side by side (one per H200, 16 threads each)
mkdir -p $OUT
F="SR3D_POINTMAP_BACKEND=auto,SR3D_VLLM_QUANTIZATION=fp8,SR3D_MULTIVIEW_PROCESS_RES=280"
( CUDA_VISIBLE_DEVICES=0 timeout -s INT -k 10 525 python3 -m service.cli bench pipeline --dummy-8b --config "fast-1stream:$F,SR3D_DEPTH_STREAMS=1" --config fast --config "fast-4streams:$F,SR3D_DEPTH_STREAMS=4,SR3D_DEPTH_BATCH_JOBS=1" --concurrency 64 --duration 25 --warmup 16 --threads 16 --ready-timeout 200 --work-dir /root/bp0 --out $OUT/pipeC > $OUT/pipeC.log 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout -s INT -k 10 525 python3 -m service.cli bench pipeline --dummy-8b --config multiview --config fast-mps --config "fast-mps-4streams:$F,BENCH_MPS=1,SR3D_DEPTH_STREAMS=4,SR3D_DEPTH_BATCH_JOBS=1" --concurrency 64 --duration 25 --warmup 16 --threads 16 --ready-timeout 200 --work-dir /root/bp1 --out $OUT/pipeD > $OUT/pipeD.log 2>&1 ) &
sleep 2; ( CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m loadtests.depth_error --device cuda --shapes real --frames 32 --repeats 3 --out $OUT/depth-real > $OUT/depth-real.log 2>&1 ) &
wait
grep -h '"config"' $OUT/pipeC.log $OUT/pipeD.log; grep -h '"lever"' $OUT/depth-real.log; tail -c 1200 $OUT/pipeC.log; tail -c 1200 $OUT/pipeD.log
