#!/usr/bin/env bash
# The device check, for a machine with an NVIDIA GPU and PyTorch already installed (torch, tqdm,
# matplotlib, pytest and hypothesis; torchvision only for the benchmark's tutorial column):
#
#     bash tests/device_check.sh
#
# runs the GPU tests, times the default run (30 epochs of both models, scoring, figures) and
# --eval of the committed checkpoints on the GPU, both into a temporary folder (the committed
# checkpoints and figures are only read), says how far that --eval lands from figures/metrics.json
# (the CPU's numbers), and runs the benchmark on the GPU. Each step is bounded in time; the whole
# ends within about 8 minutes on one GPU and prints what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
export TQDM_DISABLE=1

seconds() {  # seconds LIMIT COMMAND...: run it under a time limit, print its wall-clock seconds
    local limit="$1" start status
    shift
    start=$(date +%s%N)
    timeout "$limit" "$@"
    status=$?
    local ms=$(( ($(date +%s%N) - start) / 1000000 ))
    echo "exit $status, $((ms / 1000)).$(printf %03d $((ms % 1000))) s wall: $*"
    return "$status"
}

echo "== the machine"
"$python" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

echo "== the GPU tests (tests/test_cuda.py)"
seconds 240 "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py

echo "== the default run on the GPU: python main.py --device cuda"
seconds 200 "$python" main.py --device cuda --checkpoint-dir "$out/run" --figure-dir "$out/run" \
    > "$out/run.log" 2>&1
tail -n 24 "$out/run.log"

echo "== --eval of the committed checkpoints on the GPU"
mkdir -p "$out/eval" && cp figures/metrics.json "$out/eval/"  # its IWAE sample count
seconds 60 "$python" main.py --eval --device cuda --figure-dir "$out/eval" > "$out/eval.log" 2>&1
tail -n 16 "$out/eval.log"
"$python" - "$out/eval/metrics.json" <<'EOF'
import json, sys
sys.path.insert(0, "tests")
from test_cuda import differences
found = differences(json.load(open(sys.argv[1])), json.load(open("figures/metrics.json")))
found.sort(reverse=True)
print(f"{len(found)} numbers against figures/metrics.json (CPU): the largest relative differences")
for relative, where, close in found[:8]:
    print(f"  {relative:.2e}  {where}{'' if close else '  (beyond the tests tolerance)'}")
EOF

echo "== the benchmark on the GPU: python benchmark.py --device cuda --repeats 3"
seconds 150 "$python" benchmark.py --device cuda --repeats 3
