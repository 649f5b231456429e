#!/usr/bin/env bash
# GPU check (run on a lent GPU machine through the device tool; CI never has a GPU):
#   1. the decoder, training and evaluation tests with the tiny pair placed on CUDA (the evaluate and CLI tests
#      load with --device auto, so they run there too);
#   2. load_pair(device="auto") from local directories -> accelerate device_map on the GPU, bf16;
#   3. joint LoRA training of a small base + head on CUDA (the paper's joint objective) lowers the marginal NLL.
set -uo pipefail
export COLM_TEST_DEVICE=cuda PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_decode.py tests/test_train.py tests/test_evaluate.py \
  tests/test_cli.py tests/test_models.py 2>&1 | tail -n 25 | tee "$OUT/pytest-cuda.txt"
python3 bench/gpu_joint.py 2>&1 | tee "$OUT/joint.txt"
