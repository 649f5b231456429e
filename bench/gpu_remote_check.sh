#!/usr/bin/env bash
# Issue 20's check against a real vLLM (or SGLang) server, for a GPU machine with network access (the lent
# device machines here have neither vLLM nor the models).  Serves the expert, then runs the remote tests that
# need a real server against it, comparing with the same expert run in process on torch.
#   bash bench/gpu_remote_check.sh [vllm|sglang] [MODEL]        (default: vllm Qwen/Qwen2.5-Coder-1.5B-Instruct)
set -euo pipefail
API=${1:-vllm}
MODEL=${2:-Qwen/Qwen2.5-Coder-1.5B-Instruct}
PORT=8011
if [ "$API" = vllm ]; then
  pip install -q vllm
  vllm serve "$MODEL" --port $PORT --max-logprobs 20 --dtype bfloat16 > /tmp/colm-vllm.log 2>&1 &
else
  pip install -q "sglang[all]"
  python -m sglang.launch_server --model-path "$MODEL" --port $PORT > /tmp/colm-sglang.log 2>&1 &
fi
SERVER=$!
trap 'kill $SERVER' EXIT
for i in $(seq 1 120); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 5; done
COLM_TEST_EXPERT_URL="http://127.0.0.1:$PORT" COLM_TEST_EXPERT_API="$API" COLM_TEST_EXPERT_LOCAL="$MODEL" \
  python -m pytest -q tests/test_remote.py -k "external_server" -rs
