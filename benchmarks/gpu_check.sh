#!/usr/bin/env bash
# The GPU check, prepared so a GPU's minutes go to running: nothing is installed beyond the
# package itself (editable, no dependencies: torch with CUDA must already be there).
#   benchmarks/gpu_check.sh            # the CUDA tests, then the overhead benchmark
# Each part has its own time limit; the script ends with the first failing part's status.
set -uo pipefail
cd "$(dirname "$0")/.."

python - <<'PY' || exit 3
import torch
assert torch.cuda.is_available(), "no CUDA device visible: this check needs a GPU"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
PY
python -c "import disttrain" 2>/dev/null || pip install -q --no-deps -e . || exit 3
python -c "import pytest, xdist, yaml" || exit 3

status=0
# the CUDA path: NCCL, 16-mixed + validation + monitored checkpoint, FSDP bf16 + DCP resume,
# the char-LM example for GPU_CHARLM_STEPS (default 300) steps with its tokens/s
timeout 540 python -m pytest -q -s -p no:cacheprovider tests/test_gpu.py || status=$?
# the loop's overhead on the GPU (NCCL under torchrun, each step's stamp after the GPU's work)
timeout 240 python benchmarks/overhead.py --accelerator cuda --rounds 3 --steps 200 \
    || { rc=$?; [ "$status" -eq 0 ] && status=$rc; }
exit "$status"
