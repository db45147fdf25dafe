#!/usr/bin/env bash
# Paper-sized PDPE-Net (configs/train_paper.json: 1 mm grid, 256 x 256 slices, channels 32-256) on one GPU for
# a fixed wall-time budget, from the bundle root: regenerate the cohort (deterministic, all cores), train until
# the budget is spent (the snapshots of finished epochs stay), then keep half-precision copies of chosen
# snapshots (a 9M-parameter state dict is 36 MB in float32, 18 MB in float16: less to copy off a lent machine).
#
#   bash scripts/train_gpu.sh SECONDS OUT_DIR [more `monai.bundle run` arguments, e.g. --network_def#embed_parameters false]
set -euo pipefail
budget=$1
out=$2
shift 2
cohort=${COHORT:-data/phantoms_head}
workers=$(nproc)

[ -f "$cohort/datalist.json" ] || python -m scripts.phantom --out "$cohort" --subjects 40 --seed 0 --head --workers "$workers"

rc=0
timeout -k 60 -s INT "$budget" python -m monai.bundle run training \
    --config_file "['configs/train.json','configs/train_paper.json']" \
    --dataset_dir "$cohort" --num_workers $((workers - 2)) "--train#dataset#num_workers" "$workers" \
    --val_interval 2 --ckpt_dir "$out/ckpt" --output_dir "$out" "$@" || rc=$?
# 124: the budget ran out, which is how this run is meant to end
[ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || exit "$rc"

python - "$out" <<'EOF'
"""The best snapshot on the phantom validation, the last one and the one halfway, as float16 state dicts."""
import sys
from pathlib import Path

import torch

out = Path(sys.argv[1])
snapshots = sorted((out / "snapshots").glob("model_epoch=*.pt"), key=lambda p: int(p.stem.split("=")[1]))
chosen = {"best": out / "ckpt" / "model.pt", "last": snapshots[-1], "half": snapshots[(len(snapshots) - 1) // 2]}
for name, path in chosen.items():
    state = torch.load(path, map_location="cpu")
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, out / f"{name}_fp16.pt")
    print(f"{name}: {path}")
EOF
