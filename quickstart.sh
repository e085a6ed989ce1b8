#!/usr/bin/env bash
# Install suprem_net and run the whole pipeline on a generated synthetic abdominal CT dataset.
# Data goes to ./suprem_data/{raw,preprocessed,results} unless SUPREM_raw/... are set.
set -euo pipefail
cd "$(dirname "$0")"
# CPU machines: torch is pinned so no dependency pulls a multi-GB CUDA build. With a GPU,
# install your CUDA torch first and drop the pin.
python -m pip install -q --disable-pip-version-check torch==2.13.0 -e ".[test]"
suprem_synthetic -d 900 --cases 12 --test-cases 2
suprem_plan_and_preprocess -d 900
