#!/usr/bin/env bash
# Install suprem_net and run the whole pipeline on a generated synthetic abdominal CT dataset:
# generate -> check + fingerprint + plan + preprocess -> train (short) -> predict -> evaluate.
# Data goes to ./suprem_data/{raw,preprocessed,results} unless SUPREM_raw/... are set.
set -euo pipefail
cd "$(dirname "$0")"
# CPU machines: torch is pinned so no dependency pulls a multi-GB CUDA build. With a GPU,
# install your CUDA torch first and drop the pin.
python -m pip install -q --disable-pip-version-check torch==2.13.0 -e ".[test]"
RAW=${SUPREM_raw:-suprem_data/raw}/Dataset900_SynthAbdomen
suprem_synthetic -d 900 --cases 12 --test-cases 2
# CPU: a plan for training steps of about 1 s, timed on this machine
suprem_plan_and_preprocess -d 900 --cpu-seconds-per-iteration 1
# a short run: 3 minutes of training, whatever the machine; drop the flag for the plan's full schedule
suprem_train 900 0 --time-budget 3m
suprem_predict -i "$RAW/imagesTs" -o suprem_data/predictions -d 900 -f 0 --no-tta --preview
suprem_evaluate -ref "$RAW/labelsTs" -pred suprem_data/predictions -l "$RAW/dataset.json"
echo "progress plot: suprem_data/results/Dataset900_SynthAbdomen/suprem_plans/fold_0/progress.png"
echo "previews:      suprem_data/predictions/*.png"
