#!/usr/bin/env bash
# The embedded default with a tiny SAM2 (Meta's sam2 package, tool kind "sam2") as its tool, beside
# the default pipeline's tiny SAM: the same base policy (models/base/policy), the same tool warm-up
# recipe (pretrain.sam: 1,200 steps on ground-truth prompts), the same B-GRTO bootstrap and RL budget.
#
#   bash benchmarks/sam2_default.sh            # in a project where `dvc repro` has run (needs grto[sam2])
#   SAM2_WARMUP_STEPS=4800 bash benchmarks/sam2_default.sh   # the tiny SAM2 needs ~2,800 steps to leave
#                                                            # the plateau the tiny SAM leaves at ~250 (README)
#
# Writes models/{base,bootstrap,trained}_sam2 and results/{base,trained}_sam2/<split>/metrics.json; the
# SAM rows to compare with are results/{base,trained}/<split>/metrics.json from `dvc repro`.
set -euo pipefail
test -d models/base/policy || { echo "run dvc repro first (models/base is missing)" >&2; exit 2; }
python -c "import sam2" 2>/dev/null || { echo "needs Meta's sam2 package: pip install 'grto[sam2]'" >&2; exit 2; }

# 1. the tiny SAM2's warm-up (the policy's is skipped: the base policy is reused as is)
grto pretrain --out models/base_sam2_warmup --set pretrain.tool_kind=sam2 --set pretrain.shipped=false \
  --set pretrain.sam.steps="${SAM2_WARMUP_STEPS:-1200}" \
  --set pretrain.sft.steps=0 --set pretrain.parallel=false --set pretrain.live=results/pretrain_sam2
rm -rf models/base_sam2 && mkdir -p models/base_sam2
cp -r models/base/policy models/base_sam2/policy
cp -r models/base_sam2_warmup/tool models/base_sam2/tool
[ -f models/base/run.json ] && cp models/base/run.json models/base_sam2/run.json

# 2. the base with the tiny SAM2, on both test splits
for split in testA testB; do
  grto evaluate --split $split --checkpoint models/base_sam2 --out results/base_sam2/$split/metrics.json
done

# 3. B-GRTO: bootstrap the tool, then RL, as dvc.yaml's stages with their outputs renamed
grto bootstrap --set bootstrap.base=models/base_sam2 --set bootstrap.out=models/bootstrap_sam2 \
  --set bootstrap.cache=rollouts/bootstrap_sam2.jsonl --set bootstrap.live=results/bootstrap_sam2
grto train --set train.base=models/base_sam2 --set train.bootstrap=models/bootstrap_sam2 \
  --set train.out=models/trained_sam2 --set train.checkpoints=checkpoints/train_sam2 --set train.live=results/train_sam2
for split in testA testB; do
  grto evaluate --split $split --checkpoint models/trained_sam2 --out results/trained_sam2/$split/metrics.json
done
