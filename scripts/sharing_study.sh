#!/usr/bin/env bash
# The sharing study (issue 12, docs/benchmarks.md): 5-fold cross-validation of each sharing scheme
# on the hippocampus with the same planned network and the same number of steps per fold
# (20 epochs x 50 steps, ~10 min per fold on 2 CPU cores), then one segshare-crossval over all of
# them (ranking, pairwise ensembles, paired comparison against the first scheme).
# Every fold resumes: rerun the same command to continue an interrupted study.
#
#   SCHEMES="none stage global" bash scripts/sharing_study.sh OUT [HYDRA_OVERRIDE ...]
#
# e.g. bash scripts/sharing_study.sh /tmp/study data.preprocessed_dir=/tmp/hp_recipe
# (data.root defaults to $SEGSHARE_HIPPOCAMPUS or ../shared/data/Task04_Hippocampus).
# STUDY_STAGE=train or =crossval runs one half only (e.g. one scheme per CPU core, then the merge).
set -euo pipefail
out=${1:?usage: sharing_study.sh OUT [HYDRA_OVERRIDE ...]}
shift
read -r -a schemes <<< "${SCHEMES:-none stage global}"
stage=${STUDY_STAGE:-all}

if [[ $stage == all || $stage == train ]]; then
    for scheme in "${schemes[@]}"; do
        segshare-train -m data=hippocampus data.fold=0,1,2,3,4 "sharing=$scheme" \
            trainer.max_epochs=20 trainer.val_every=20 trainer.progress=false \
            "hydra.sweep.dir=$out/$scheme" "$@"
    done
fi
if [[ $stage == all || $stage == crossval ]]; then
    configs=()
    for scheme in "${schemes[@]}"; do
        configs+=("$scheme:[$out/$scheme/0,$out/$scheme/1,$out/$scheme/2,$out/$scheme/3,$out/$scheme/4]")
    done
    joined=$(IFS=,; echo "${configs[*]}")
    segshare-crossval "runs_by_config={$joined}" "output=$out/crossval" progress=false
fi
