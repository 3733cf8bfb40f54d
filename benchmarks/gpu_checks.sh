#!/usr/bin/env bash
# regrow's GPU checks in one run: at most 9.5 minutes on one H200 with torch + CUDA, torchvision and timm installed
# (each step has its own time limit).
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]
#
# 1. tests/test_gpu.py: structural pruning on CUDA chooses what it chooses on the CPU, no probe runs on the GPU,
#    the global ranking (tests/test_ranking.py) finds on CUDA the masks it finds on the CPU,
#    recovery in bf16 / fp16 keeps masks exact, 2:4 acceleration matches the dense output.
# 2. benchmarks.zoo: the torchvision and timm models of the GPU issue pruned to macs=0.5; speed-ups at batch 1 and
#    a large batch, fp32 and bf16.
# 3. benchmarks.gpu_recovery: regrow's recovery step against a hand-written masked loop, fp32 and bf16.
# 4. benchmarks.semi_structured: 2:4 MLP blocks, dense vs semi-structured kernels, 1,024-8,192 tokens.
# 5. benchmarks.vit_batch1: which part of a shrunk ViT costs at batch 1.
#
# Results go to benchmarks/results/ (and are copied to OUT_DIR when given); commit them with this command.
# regrow's own dependencies that the machine lacks (pydantic, torch-pruning, ...) come as wheels: `make gpu-wheels`
# here puts them in .whl/ (ignored by git; carry it to the machine), and they are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch, regrow; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'regrow', regrow.__version__)"

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep going on failure, remember it
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@"; local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start))s"
  [ $rc -eq 0 ] || status=1
}
step tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_precision.py tests/test_accelerate.py tests/test_ranking.py tests/test_checkpoint.py::test_recovery_on_cuda_resumes_to_the_same_weights
step zoo 210 python3 -m benchmarks.zoo
step gpu_recovery 120 python3 -m benchmarks.gpu_recovery
step semi_structured 80 python3 -m benchmarks.semi_structured
step vit_batch1 60 python3 -m benchmarks.vit_batch1

if [ $# -ge 1 ]; then
  mkdir -p "$1" && cp benchmarks/results/{zoo,gpu_recovery,semi_structured,vit_batch1}.{md,json} "$1"/ 2>/dev/null
fi
exit $status
