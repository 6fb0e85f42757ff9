#!/usr/bin/env bash
# The device check, for a machine with an NVIDIA GPU (CUDA) or a Mac's GPU (MPS) and PyTorch already
# installed (torch, tqdm, matplotlib, pytest and hypothesis; torchvision only for the benchmark's
# tutorial column):
#
#     bash tests/device_check.sh          # cuda where it is present, else mps, else the CPU
#     bash tests/device_check.sh mps      # or name the device
#
# runs the accelerator tests (tests/test_accelerator.py), times the default run (30 epochs of both
# models, scoring, figures) and --eval of the committed checkpoints on the device, both into a
# temporary folder (the committed checkpoints and figures are only read), says how far that --eval
# lands from figures/metrics.json (the CPU's numbers), and runs the benchmark there. It uses only
# what stock macOS has too (no GNU `timeout`, BSD `date`): the time limits and the clock are
# Python's. Each step has a limit; the limits add up to 480 s, so the whole ends within 8 minutes
# and prints what it measured. On a machine with neither GPU it runs the same steps on the CPU
# (the accelerator tests then skip), which takes longer than its limits allow the default run.
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
device="${1:-$("$python" -c "import torch; print('cuda' if torch.cuda.is_available() else
    'mps' if torch.backends.mps.is_available() else 'cpu')")}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
export TQDM_DISABLE=1

seconds() {  # seconds LIMIT COMMAND...: run it under a time limit, print its exit code and wall-clock seconds
    "$python" -c '
import subprocess, sys, time
limit, command = float(sys.argv[1]), sys.argv[2:]
start = time.monotonic()
try:
    status = subprocess.run(command, timeout=limit).returncode
except subprocess.TimeoutExpired:
    status = 124  # as GNU timeout says it
print(f"exit {status}, {time.monotonic() - start:.3f} s wall (limit {limit:g} s): {chr(32).join(command)}")
sys.exit(status)' "$@"
}

echo "== the machine and the device: $device"
"$python" -c "import platform, torch; print(platform.platform(), '| torch', torch.__version__, '| CUDA',
    torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else
    'MPS' if torch.backends.mps.is_available() else 'no GPU')"

echo "== the accelerator tests (tests/test_accelerator.py)"
seconds 180 "$python" -m pytest -q -p no:cacheprovider tests/test_accelerator.py

echo "== the default run: python main.py --device $device"
seconds 150 "$python" main.py --device "$device" --checkpoint-dir "$out/run" --figure-dir "$out/run" \
    > "$out/run.log" 2>&1
tail -n 24 "$out/run.log"

echo "== --eval of the committed checkpoints: python main.py --eval --device $device"
mkdir -p "$out/eval" && cp figures/metrics.json "$out/eval/"  # its IWAE sample count
seconds 60 "$python" main.py --eval --device "$device" --figure-dir "$out/eval" > "$out/eval.log" 2>&1
tail -n 16 "$out/eval.log"
"$python" - "$out/eval/metrics.json" <<'EOF'
import json, sys
sys.path.insert(0, "tests")
from test_accelerator import differences
found = differences(json.load(open(sys.argv[1])), json.load(open("figures/metrics.json")))
found.sort(reverse=True)
print(f"{len(found)} numbers against figures/metrics.json (CPU): the largest relative differences")
for relative, where, close in found[:8]:
    print(f"  {relative:.2e}  {where}{'' if close else '  (beyond the tests tolerance)'}")
EOF

echo "== the benchmark: python benchmark.py --device $device --repeats 3"
seconds 90 "$python" benchmark.py --device "$device" --repeats 3
