#!/usr/bin/env bash
# GPU check for Veil, for a machine with a CUDA GPU (about 6 minutes on one H100).
#
#   VEIL_DATA_DIR=/path/to/data bash benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. the environment (GPU, driver, torch, CUDA, bf16 support)
# 2. correctness of the GPU paths (benchmarks/gpu_checks.py): no host sync inside a step,
#    bf16 autocast against fp32, channels_last against contiguous and fp64, torch.compile
# 3. `veil bench` at width 1.0, batch 128 and 512, with the defaults (bf16, channels_last)
#    and with fp32 / contiguous for comparison
# 4. a short full-width CIFAR-10 run (3 pretraining epochs, one adversarial round) if the data
#    is there ($VEIL_DATA_DIR, else ../shared/data or ./shared/data)
# 5. with 2 or more GPUs: the same run with `veil train --nproc 2` (NCCL, SyncBatchNorm)
#
# Everything is written to OUT_DIR (default $OUT, else benchmarks/results/gpu-DATE): the log,
# bench JSON, checks JSON, and report.md, a section to paste into docs/benchmarks.md.
set -u
cd "$(dirname "$0")/.."
STAMP=$(date -u +%Y-%m-%dT%H%MZ)
DEST=${1:-${OUT:-benchmarks/results/gpu-$STAMP}}
mkdir -p "$DEST"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
LOG="$DEST/log.txt"
exec > >(tee -a "$LOG") 2>&1
budget() { timeout "$1" "${@:2}" || echo "!! '${*:2}' failed or ran past $1 s (exit $?)"; }

echo "== environment ($STAMP)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -5
"$PY" - <<'EOF'
import importlib, platform, sys
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
print(f"cuda available {torch.cuda.is_available()}, devices {torch.cuda.device_count()}, bf16 {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}")
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
missing = [m for m in ("numpy", "safetensors", "yaml", "tqdm", "PIL") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)}")
EOF
[ $? -eq 0 ] || { echo "!! environment not usable; stopping"; exit 1; }

echo "== correctness of the GPU paths"
budget 150 "$PY" benchmarks/gpu_checks.py | tee "$DEST/checks.json"

echo "== veil bench, width 1.0"
for args in "batch_size=128" "batch_size=512 eval_batch_size=1024" "batch_size=512 eval_batch_size=1024 precision=fp32 channels_last=off"; do
    name=$(echo "$args" | tr ' =' '_-')
    budget 90 "$PY" -m veil bench width=1.0 device=cuda $args --batches 40 --repeats 5 --json > "$DEST/bench-$name.json"
    "$PY" -c "import json,sys; from veil.bench import format_table; print(format_table(json.load(open(sys.argv[1]))))" "$DEST/bench-$name.json" 2>/dev/null || cat "$DEST/bench-$name.json"
done

DATA=${VEIL_DATA_DIR:-}
for d in ../shared/data shared/data; do [ -z "$DATA" ] && [ -d "$d/cifar10" ] && DATA=$d; done
RUN_ARGS="--config configs/paper-cifar10.yaml pretrain_epochs=3 t_main=1 warmup_epochs=1 progress=false"
if [ -n "$DATA" ] && [ -d "$DATA/cifar10" ]; then
    echo "== short full-width CIFAR-10 run (data: $DATA)"
    rm -rf /tmp/veil-gpu-run
    VEIL_DATA_DIR=$DATA budget 180 "$PY" -m veil train $RUN_ARGS --out /tmp/veil-gpu-run
    cp /tmp/veil-gpu-run/metrics.jsonl "$DEST/run-metrics.jsonl" 2>/dev/null
    if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
        echo "== the same run on 2 GPUs (torchrun, NCCL, SyncBatchNorm)"
        rm -rf /tmp/veil-gpu-run2
        VEIL_DATA_DIR=$DATA budget 180 "$PY" -m veil train --nproc 2 $RUN_ARGS --out /tmp/veil-gpu-run2
        cp /tmp/veil-gpu-run2/metrics.jsonl "$DEST/run2-metrics.jsonl" 2>/dev/null
    else
        echo "== one GPU: multi-process NCCL not checked (NCCL needs one GPU per process)"
    fi
else
    echo "== no CIFAR-10 data found (set VEIL_DATA_DIR); short run skipped"
fi

"$PY" - "$DEST" "$STAMP" <<'EOF' > "$DEST/report.md"
import glob, json, os, sys
import torch
dest, stamp = sys.argv[1], sys.argv[2]
print(f"### GPU check, {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}, {stamp}\n")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}; command: `bash benchmarks/gpu_check.sh`\n")
try:
    checks = json.load(open(os.path.join(dest, "checks.json")))
    print("Checks: " + ", ".join(f"{k} {'ok' if v.get('ok') else 'FAILED'}" for k, v in checks.items() if isinstance(v, dict)) + "\n")
except (OSError, ValueError):
    print("Checks: no result\n")
for path in sorted(glob.glob(os.path.join(dest, "bench-*.json"))):
    try:
        r = json.load(open(path))
    except ValueError:
        continue
    print(f"`veil bench width=1.0 {os.path.basename(path)[6:-5]}` ({r['precision']}{', channels_last' if r['channels_last'] else ''}):\n")
    print("| phase | veil img/s | bare img/s | ratio | TFLOP/s | peak MiB |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, p in r["phases"].items():
        print(f"| {name} | {p['images_per_s']:.0f} | {p['bare_images_per_s']:.0f} | {p['ratio']:.2f} | {p['flop_per_s'] / 1e12:.1f} | {p['peak_memory_mb'] or 0:.0f} |")
    print()
for label, name in (("1 GPU", "run-metrics.jsonl"), ("2 GPUs", "run2-metrics.jsonl")):
    path = os.path.join(dest, name)
    if os.path.exists(path):
        rows = [json.loads(line) for line in open(path)]
        print(f"Short full-width CIFAR-10 run, {label}: " + "; ".join(
            f"{m['phase']} {m['seconds']:.1f} s, test acc {m['test_accuracy']:.2%}" for m in rows) + "\n")
EOF
cat "$DEST/report.md"
echo "== done; results in $DEST"
