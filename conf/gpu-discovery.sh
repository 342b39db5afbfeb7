#!/usr/bin/env bash
# Spark GPU discovery script: prints the GPUs of this executor as Spark's resource JSON.
# (Same contract as examples/src/main/scripts/getGpusResources.sh in Apache Spark.)
set -euo pipefail
addrs=$(nvidia-smi --query-gpu=index --format=csv,noheader | sed -e 's/^/"/' -e 's/$/"/' | paste -sd, -)
echo "{\"name\": \"gpu\", \"addresses\": [${addrs}]}"
