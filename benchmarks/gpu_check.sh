#!/usr/bin/env bash
# The GPU checks, as one script for a lent CUDA machine (see docs/training.md):
#   1. the planner's memory model against torch.cuda.max_memory_allocated (synthetic plans);
#   2. a real 3D run (60 MSD hippocampus cases in .gpudata/) planned for the detected GPU and
#      trained with AMP: run.json records the estimate next to the measured peak;
#   3. the demo (2D segmentation + RGB classification) planned and trained on CUDA;
#   4. torchrun with one NCCL process.
# Wheels for what the machine lacks travel in .whl/ (SimpleITK, nibabel, batchgenerators).
# Every step is time-limited and logged to $OUT; a failed step does not stop the others.
set -u
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/pip.txt" 2>&1 || echo "pip install failed (see pip.txt)"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 AUTOPLAN_PROGRESS=0 MPLBACKEND=Agg
W=/tmp/gpuwork; F="--raw $W/raw --preprocessed $W/pre --results $W/results"
step() { local name=$1 limit=$2; shift 2; echo "=== $name"; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1; local rc=$?
  echo "rc=$rc in $((SECONDS - t0)) s"; tail -n 25 "$OUT/$name.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
step memory_model 150 python3 benchmarks/memory_model.py --device cuda --budgets 8,24,78
step hippocampus 240 bash -c "python3 -m autoplan import Hippo --images .gpudata/imagesTr --masks .gpudata/labelsTr \
  --label-map 1=anterior,2=posterior --raw $W/raw && python3 -m autoplan plan-and-train Hippo $F --fold 0 \
  --time-budget 2 --run-name gpu && cat $W/results/Hippo/3d_fullres/gpu/fold_0/run.json"
step demo 150 python3 -m autoplan demo --workdir $W/demo --time-budget 0.5
step torchrun 90 torchrun --nproc_per_node 1 -m autoplan train Hippo $F --fold 1 --time-budget 0.5 --run-name ddp
cp "$W"/results/Hippo/plans.json "$OUT/" 2>/dev/null
