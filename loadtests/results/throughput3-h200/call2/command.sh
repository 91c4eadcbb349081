# GPU point pooling in prepare: bench fast vs fast with the CPU path (GPU0); GPU tests then multiview (GPU1)
mkdir -p $OUT
F="SR3D_POINTMAP_BACKEND=auto,SR3D_VLLM_QUANTIZATION=fp8,SR3D_MULTIVIEW_PROCESS_RES=280"
( CUDA_VISIBLE_DEVICES=0 timeout -s INT -k 10 500 python3 -m service.cli bench pipeline --dummy-8b --config fast --config "fast-cpuprep:$F,SR3D_VLLM_PREPARE_DEVICE=cpu" --concurrency 64 --duration 25 --warmup 16 --threads 16 --ready-timeout 200 --work-dir /root/bp0 --out $OUT/pipeG > $OUT/pipeG.log 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=1; timeout 60 python3 -m pytest -q -s -rs -p no:cacheprovider tests/gpu/test_prepare_device.py > $OUT/prepare_device.log 2>&1; timeout 200 python3 -m pytest -q -rs -p no:cacheprovider tests/gpu/test_vllm_equality.py > $OUT/equality.log 2>&1; timeout -s INT -k 10 230 python3 -m service.cli bench pipeline --dummy-8b --config multiview --concurrency 64 --duration 25 --warmup 16 --threads 16 --ready-timeout 200 --work-dir /root/bp1 --out $OUT/pipeH > $OUT/pipeH.log 2>&1 ) &
wait
tail -n 3 $OUT/prepare_device.log $OUT/equality.log; grep -h '"config"' $OUT/pipeG.log $OUT/pipeH.log; tail -c 800 $OUT/pipeG.log
