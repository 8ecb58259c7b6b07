#!/usr/bin/env bash
# The ablation of docs/training.md: one training run per row at the bare job's
# budget, then the same evaluation for each (1,000 samples, 100 respaced
# steps, sampling seeds 0 and 1, scored by `tinyddpm eval`).
#
#   bash benchmarks/lab/ablation.sh OUT_DIR ROW [ROW ...]
#
# ROW is NAME=OPTIONS, e.g. 'cosine-lr=--lr-schedule cosine'; OPTIONS go to
# `tinyddpm train` after the common ones below. Sampling options for a row
# come after a '|': 'ddim=|--sampler ddim' samples the checkpoint of the row
# named by SAMPLE_FROM (default: baseline) instead of training.
# Each row writes OUT_DIR/NAME/{train.log,metrics.csv,config.json,checkpoint.npz,
# samples-*.png,grid.png,s0.npz,s1.npz,eval0.json,eval1.json,times.txt} and one
# JSON line to OUT_DIR/results.jsonl. SEEDS (default "0 1") picks the sampling
# seeds. A finished row or seed is skipped when run again.
set -euo pipefail
out=$1; shift
mkdir -p "$out"
py=${PYTHON:-python}
# Each row changes one thing from the baseline: the paper's recipe shortened
# to the bare job's length (linear betas, lr 1e-3 constant after warm-up, a
# fixed EMA decay of 0.995, eq. 14 unweighted, sigma^2 = beta), which were the
# CPU defaults before they took the ablation's winners. A row's own options
# come after these and win.
paper="--schedule linear --lr-schedule constant --ema-schedule fixed --ema-decay 0.995 --loss-weight uniform \
--variance beta"
common=${COMMON:---seed 0 --sample-every 0 --save-every 500 $paper}
for row in "$@"; do
    name=${row%%=*}
    spec=${row#*=}
    train_opts=${spec%%|*}
    sample_opts=""
    [[ "$spec" == *"|"* ]] && sample_opts=${spec#*|}
    dir="$out/$name"
    seeds=${SEEDS:-0 1}
    last=${seeds##* }
    if [ -s "$dir/eval$last.json" ]; then echo "$name: done already"; continue; fi
    mkdir -p "$dir"
    ckpt="$dir/checkpoint.npz"
    if [[ "$spec" == "|"* ]]; then
        ckpt="$out/${SAMPLE_FROM:-baseline}/checkpoint.npz"
    elif [ ! -f "$ckpt" ] || ! grep -q '^done' "$dir/train.log" 2>/dev/null; then
        start=$(date +%s)
        # shellcheck disable=SC2086
        $py -m tinyddpm train $common $train_opts --out "$dir" > "$dir/train.log" 2>&1 || \
            $py -m tinyddpm train --resume --out "$dir" >> "$dir/train.log" 2>&1
        echo "train_wall_s $(( $(date +%s) - start ))" > "$dir/times.txt"
    fi
    for seed in $seeds; do
        if [ -s "$dir/eval$seed.json" ]; then continue; fi
        start=$(date +%s)
        # shellcheck disable=SC2086
        $py -m tinyddpm sample "$ckpt" --n 1000 --steps 100 --seed "$seed" $sample_opts \
            --npz "$dir/s$seed.npz" --out "$dir/grid$seed.png" > "$dir/sample$seed.log" 2>&1
        echo "sample${seed}_wall_s $(( $(date +%s) - start ))" >> "$dir/times.txt"
        $py -m tinyddpm eval --samples "$dir/s$seed.npz" 2>/dev/null | tail -n 1 > "$dir/eval$seed.json"
    done
    # shellcheck disable=SC2086
    $py - "$name" "$dir" "$train_opts" "$sample_opts" $seeds >> "$out/results.jsonl" <<'EOF'
import csv, json, statistics, sys
name, folder, train_opts, sample_opts, *seeds = sys.argv[1:]
row = {"row": name, "train_options": train_opts.strip(), "sample_options": sample_opts.strip()}
for seed in seeds:
    scores = json.loads(open(f"{folder}/eval{seed}.json").read())
    row[f"fid_seed{seed}"], row[f"is_seed{seed}"] = scores["fid"], scores["inception_score"]
for line in open(f"{folder}/times.txt"):
    key, value = line.split()
    row[key] = int(value)
try:
    rows = list(csv.DictReader(open(f"{folder}/metrics.csv")))
    row["train_elapsed_s"] = float(rows[-1]["elapsed_s"])
    row["steps"] = int(rows[-1]["step"])
    row["median_images_per_s"] = statistics.median(float(r["images_per_s"]) for r in rows)
    row["final_loss"] = float(rows[-1]["loss"])
except OSError:
    pass
print(json.dumps(row))
EOF
    tail -n 1 "$out/results.jsonl"
done
