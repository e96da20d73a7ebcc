#!/usr/bin/env bash
# Regenerates every example of the README section "Use a trained model" and docs/predict_search.png:
# predict.py, on the 1,000 synthetic test images, with the default run's checkpoint ($CKPT) and
# the benchmark's vqa, itg and ic fine-tunes of it ($BENCH/<task>/best.safetensors), each made
# first if missing (`python train.py`, then `python evaluate.py --benchmark synth`, about 40
# minutes on 2 cores). The transcript (each command, then its output) goes to
# runs/examples/transcript.txt; copy its excerpts into the README and record the run in docs/NOTES.md.
#
#   bash docs/predict_examples.sh
#   CKPT=runs/readme/seed0/checkpoint.safetensors BENCH=runs/benchmark bash docs/predict_examples.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=${CKPT:-runs/pretrain/checkpoint.safetensors}
BENCH=${BENCH:-runs/benchmark}
OUT=runs/examples
SCANS=runs/scans  # the 1,000 test images, as links
TRANSCRIPT=$OUT/transcript.txt

[ -f "$CKPT" ] || nice -n 10 python train.py --out "$(dirname "$CKPT")"
[ -f "$BENCH/vqa/best.safetensors" ] || nice -n 10 python evaluate.py --benchmark synth --checkpoint "$CKPT" --out "$BENCH"

# The 1,000 test images (in a folder of their own, $SCANS) and their reports, one a line, in manifest order.
rm -rf "$OUT" "$SCANS" && mkdir -p "$OUT" "$SCANS"
python - "$OUT" "$SCANS" <<'EOF'
import os, sys
from data import read_manifest
out, scans = sys.argv[1:]
records, _ = read_manifest("data/synth/retrieval", "test")
for r in records:
    os.symlink(os.path.abspath(f"data/synth/images/{r['image']}"), f"{scans}/{r['image']}")
open(f"{out}/test_reports.txt", "w").write("".join(r["text"] + "\n" for r in records))
EOF

show() {  # a command (quoted as a shell would need it), then what it printed
  echo "\$ $(python -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "$@")"; nice -n 10 "$@" 2>&1; echo
}
truth() {  # the synthetic ground truth of the images named
  python - "$@" <<'EOF'
import sys
from data import read_manifest
records, meta = read_manifest("data/synth/ic", "test")
labels = {r["image"]: r["labels"] for r in records}
reports = {r["image"]: r["report"] for r in read_manifest("data/synth/itg", "test")[0]}
for image in sys.argv[1:]:
    present = [c for c, v in zip(meta["classes"], labels[image]) if v] or ["none"]
    print(f"{image}: findings {', '.join(present)}; report: {reports[image]}")
EOF
}
IMAGES="$SCANS/case03300.png $SCANS/case03301.png $SCANS/case03302.png"
{
  echo "# predict.py examples, $CKPT, $(date -u +%F), torch $(python -c 'import torch; print(torch.__version__)')"
  echo
  show python predict.py search --checkpoint $CKPT --images $SCANS --query "Large right pleural effusion." \
       --top 5 --sheet docs/predict_search.png | tee $OUT/search.txt
  echo "ground truth of the hits (synthetic):"
  truth $(grep -o 'case[0-9]*\.png' $OUT/search.txt)
  echo
  show python predict.py search --checkpoint $CKPT --images $SCANS --queries $OUT/test_reports.txt \
       --top 10 --jsonl $OUT/report_search.jsonl
  python - $OUT/report_search.jsonl "$(dirname "$CKPT")/result.json" <<'EOF'
import json, sys
from data import read_manifest
records, _ = read_manifest("data/synth/retrieval", "test")
rows = [json.loads(line) for line in open(sys.argv[1])]
hits = sum(any(h["path"].endswith("/" + r["image"]) for h in row["hits"]) for r, row in zip(records, rows))
zero_shot = json.load(open(sys.argv[2]))["t2i_r10"]
print(f"own image in the top 10: {hits} of {len(rows)} reports ({100 * hits / len(rows):.1f}%); "
      f"zero-shot t2i R@10 of {sys.argv[2]}: {100 * zero_shot:.1f}%")
EOF
  echo
  show python predict.py classify --checkpoint $CKPT --images $IMAGES
  show python predict.py classify --checkpoint $BENCH/ic/best.safetensors --images $IMAGES
  show python predict.py answer --checkpoint $BENCH/vqa/best.safetensors --images $IMAGES \
       --question "Is the heart enlarged?"
  show python predict.py report --checkpoint $BENCH/itg/best.safetensors --images $IMAGES
  show python predict.py report --checkpoint $BENCH/itg/best.safetensors --images $SCANS/case03300.png  # alone: the same text
  echo "ground truth of the three images (synthetic):"
  truth case03300.png case03301.png case03302.png
} > "$TRANSCRIPT"
cat "$TRANSCRIPT"
