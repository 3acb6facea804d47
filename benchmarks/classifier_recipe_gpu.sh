#!/usr/bin/env bash
# Classifier recipe search on a lent GPU, emulating the 2-core CPU schedule of HAM10000.
#
# Every variant trains the CPU plan itself (input size, ResNet width, class weights, batch 32,
# 50-iteration epochs) for a fixed number of epochs, so it sees the images a 30-minute CPU
# run would see; three variants share the H100 and its 16 cores at a time, about 3.5 minutes
# a round of three at 160 epochs, so one 10-minute command finishes the first two rounds.
# What it ranks is the recipe (loss, weighting, learning rate, augmentation, input size at
# equal CPU time), not the GPU's speed. Data travel in .dermexp/ (git-excluded): raw/TaskDerm
# as imported by benchmarks/common.py, results/TaskDerm with the CPU plan's plans.json and
# splits.json; wheels the image lacks in .whl_small/. Run with
#   run(command="bash benchmarks/classifier_recipe_gpu.sh", carry=[".dermexp", ".whl_small"])
# EPOCHS (default 160) is what the CPU reaches in 27 minutes at the planned speed. Results:
# $OUT/summary.md (one table) and $OUT/runs.tar.gz (metrics.json with per-case probabilities,
# log.csv and output of each variant).
# Measured 2026-11-27 (H100, torch 2.11, 1/sqrt class weights, 96x128, 160 epochs): ce 0.737 /
# 0.643 (accuracy / balanced), ce_focal 0.734 / 0.649, ce lr 3e-3 0.737 / 0.635.
set -u
OUT=${OUT:-/tmp/recipe}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl_small/*.whl \
  > "$OUT/pip.txt" 2>&1 || echo "pip install failed (see pip.txt)"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 AUTOPLAN_PROGRESS=0 MPLBACKEND=Agg OMP_NUM_THREADS=2
# JPEG cases never reach SimpleITK; where it is missing, a module whose every attribute is an
# empty class satisfies the import and the type annotations.
rm -rf /tmp/site/SimpleITK
python3 -c "import SimpleITK" 2>/dev/null || { mkdir -p /tmp/site/SimpleITK
  echo 'def __getattr__(name): return type(name, (), {})' > /tmp/site/SimpleITK/__init__.py; }
E=${EPOCHS:-160}
W=/tmp/recipe_work; mkdir -p "$W"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"

# Prepare a results folder for a variant: the CPU plan, optionally edited by a Python expression
# on the classifier configuration `c` (e.g. "c['patch_size'] = [64, 96]").
prepare() {
  local name=$1 edit=${2:-}
  mkdir -p "$W/$name/results" && cp -r .dermexp/results/TaskDerm "$W/$name/results/"
  python3 - "$W/$name/results/TaskDerm/plans.json" "$edit" <<'EOF'
import json, sys
path, edit = sys.argv[1], sys.argv[2]
plans = json.load(open(path))
c = plans["configurations"]["classifier"]
exec(edit)
json.dump(plans, open(path, "w"), indent=1)
EOF
}

preprocess() {   # once per input size, before the variants that share it start
  local name=$1 pre=$2
  python3 - "$W/$name/results" "$W/$pre" <<'EOF'
import sys, time
from autoplan.paths import resolve_folders
from autoplan.pipeline import load_plan, open_dataset
from autoplan.preprocessing import preprocess_dataset
folders = resolve_folders(".dermexp/raw", sys.argv[2], sys.argv[1])
dataset = open_dataset("TaskDerm", folders)
start = time.time()
preprocess_dataset(dataset, load_plan(dataset, folders), "classifier", folders.preprocessed, n_jobs=14)
print(f"preprocessed {sys.argv[2]} in {time.time() - start:.0f} s")
EOF
}

train() {        # name, preprocessed folder, then train options
  local name=$1 pre=$2; shift 2
  local t0=$SECONDS
  timeout 420 python3 -m autoplan train TaskDerm --raw .dermexp/raw --preprocessed "$W/$pre" \
    --results "$W/$name/results" --device cuda --workers 4 --run-name "$name" "$@" > "$W/$name.txt" 2>&1
  echo "$name rc=$? in $((SECONDS - t0)) s: $*"
  # The device hands back only a few files: everything of a variant goes into $OUT/runs.tar.gz.
  local run="$W/$name/results/TaskDerm/classifier/$name/fold_0" keep="$W/keep/$name"
  mkdir -p "$keep" && cp "$run/metrics.json" "$run/log.csv" "$keep/" 2>/dev/null
  tail -n 20 "$W/$name.txt" > "$keep/output.txt"
  summarise > "$OUT/summary.md"
  tar -czf "$OUT/runs.tar.gz" -C "$W/keep" .
}

summarise() {    # one Markdown table of every finished variant
  python3 - "$W/keep" <<'EOF'
import json, pathlib, sys
print("| variant | accuracy | balanced accuracy | macro F1 | macro AUC |")
print("|---|---|---|---|---|")
for path in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.json")):
    m = json.loads(path.read_text())
    print(f"| {path.parent.name} | {m['accuracy']:.3f} | {m['balanced_accuracy']:.3f} | "
          f"{m['macro_avg']['f1']:.3f} | {m['macro_auc']:.3f} |")
EOF
}

for v in ce ce_focal lr3e-3 ls0.1 light calib; do prepare $v; done
prepare small64 "c['patch_size'] = [64, 96]"
preprocess ce pre96 && preprocess small64 pre64

train ce pre96 --epochs "$E" &
train ce_focal pre96 --epochs "$E" --loss ce_focal &
(prepare noweights "c['imbalance']['strategy'] = 'none'"; train noweights pre96 --epochs "$E") &
wait
train lr3e-3 pre96 --epochs "$E" --lr 3e-3 &
train ls0.1 pre96 --epochs "$E" --label-smoothing 0.1 &
train small64 pre64 --epochs "$((E * 2))" &
wait
train light pre96 --epochs "$E" --augment light &
train calib pre96 --epochs 101 &
wait

cat "$OUT/summary.md"
