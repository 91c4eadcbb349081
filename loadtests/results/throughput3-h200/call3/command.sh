# fast (GPU0); decode micro-measurement, then multiview (GPU1). NB: this call ran with the GPU point pooling (call 2) still in the code: see RESULTS.md
mkdir -p $OUT
( CUDA_VISIBLE_DEVICES=1 timeout 60 python3 .gpu-stage/bin/decode_threads.py > $OUT/decode_threads.log 2>&1 ) 
( CUDA_VISIBLE_DEVICES=0 timeout -s INT -k 5 300 python3 -m service.cli bench pipeline --dummy-8b --config fast --concurrency 64 --duration 20 --warmup 12 --threads 16 --ready-timeout 200 --work-dir /root/bp0 --out $OUT/pipeI > $OUT/pipeI.log 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout -s INT -k 5 300 python3 -m service.cli bench pipeline --dummy-8b --config multiview --concurrency 64 --duration 20 --warmup 12 --threads 16 --ready-timeout 200 --work-dir /root/bp1 --out $OUT/pipeJ > $OUT/pipeJ.log 2>&1 ) &
wait
tail -n 1 $OUT/decode_threads.log; grep -h '"config"' $OUT/pipeI.log $OUT/pipeJ.log; tail -c 600 $OUT/pipeI.log
