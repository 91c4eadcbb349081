# two single-GPU pipeline benches side by side (one per H200, 16 threads each)
mkdir -p $OUT
( CUDA_VISIBLE_DEVICES=0 timeout -s INT -k 20 560 python3 -m service.cli bench pipeline --dummy-8b --config baseline --config fast --config fast-mps --concurrency 64 --duration 30 --warmup 16 --threads 16 --ready-timeout 240 --work-dir /root/bp0 --out $OUT/pipeA > $OUT/pipeA.log 2>&1 ) &
sleep 5
( CUDA_VISIBLE_DEVICES=1 timeout -s INT -k 20 555 python3 -m service.cli bench pipeline --dummy-8b --config multiview --config multiview-mps --config fast-small --concurrency 64 --duration 30 --warmup 16 --threads 16 --ready-timeout 240 --work-dir /root/bp1 --out $OUT/pipeB > $OUT/pipeB.log 2>&1 ) &
wait
grep -h '"config"' $OUT/pipeA.log $OUT/pipeB.log; tail -c 1500 $OUT/pipeA.log; tail -c 1500 $OUT/pipeB.log
