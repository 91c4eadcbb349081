# encode split + max_num_batched_tokens: two single-GPU pipeline benches side by side (one per H200, 16 threads each)
mkdir -p $OUT
F="SR3D_POINTMAP_BACKEND=auto,SR3D_VLLM_QUANTIZATION=fp8,SR3D_MULTIVIEW_PROCESS_RES=280"
( CUDA_VISIBLE_DEVICES=0 timeout -s INT -k 10 520 python3 -m service.cli bench pipeline --dummy-8b --config fast --config "fast-b8k:$F,SR3D_VLLM_MAX_NUM_BATCHED_TOKENS=8192" --config "fast-b16k:$F,SR3D_VLLM_MAX_NUM_BATCHED_TOKENS=16384" --concurrency 64 --duration 25 --warmup 16 --threads 16 --ready-timeout 200 --work-dir /root/bp0 --out $OUT/pipeE > $OUT/pipeE.log 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout -s INT -k 10 520 python3 -m service.cli bench pipeline --dummy-8b --config multiview --config "multiview-b8k:SR3D_POINTMAP_BACKEND=auto,SR3D_VLLM_MAX_NUM_BATCHED_TOKENS=8192" --concurrency 64 --duration 25 --warmup 16 --threads 16 --ready-timeout 200 --work-dir /root/bp1 --out $OUT/pipeF > $OUT/pipeF.log 2>&1 ) &
wait
grep -h '"config"' $OUT/pipeE.log $OUT/pipeF.log; tail -c 1500 $OUT/pipeE.log; tail -c 1000 $OUT/pipeF.log
