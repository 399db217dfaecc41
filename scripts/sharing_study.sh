#!/usr/bin/env bash
# The sharing study (issue 12, docs/benchmarks.md): 5-fold cross-validation of each sharing scheme
# on the hippocampus with the same planned network and the same number of steps per fold
# (STUDY_EPOCHS x 50 steps, default 12 x 50: ~8 min per fold on 2 CPU cores), one
# segshare-crossval over all of them (ranking, pairwise ensembles, paired comparison against the
# first scheme), then every fold and each scheme's 5-fold ensemble on held-out labelled cases.
#
#   SCHEMES="none stage global" bash scripts/sharing_study.sh OUT DATASET [HYDRA_OVERRIDE ...]
#
# DATASET is a dataset with a labelled hold-out set, made once by scripts/make_holdout.py:
#   python scripts/make_holdout.py ../shared/data/Task04_Hippocampus /tmp/hippo_holdout
#   bash scripts/sharing_study.sh /tmp/study /tmp/hippo_holdout data.preprocessed_dir=/tmp/hh_pre
# Folds are the outer loop and schemes the inner one, so an unfinished study is still paired
# (every scheme has the same folds). Every fold resumes, and a finished fold (its
# validation/summary.json exists) is skipped: rerun the same command to continue an interrupted study.
# STUDY_STAGE=train, =crossval or =holdout runs one part only.
set -euo pipefail
out=${1:?usage: sharing_study.sh OUT DATASET [HYDRA_OVERRIDE ...]}
dataset=${2:?usage: sharing_study.sh OUT DATASET [HYDRA_OVERRIDE ...]}
shift 2
read -r -a schemes <<< "${SCHEMES:-none stage global}"
stage=${STUDY_STAGE:-all}
epochs=${STUDY_EPOCHS:-12}
folds=(0 1 2 3 4)

runs_of() {  # the run folders of one scheme, as a Hydra list
    local scheme=$1 list=() fold
    for fold in "${folds[@]}"; do list+=("$out/$scheme/$fold"); done
    (IFS=,; echo "[${list[*]}]")
}

if [[ $stage == all || $stage == train ]]; then
    for fold in "${folds[@]}"; do
        for scheme in "${schemes[@]}"; do
            run=$out/$scheme/$fold
            [[ -f $run/validation/summary.json ]] && continue
            segshare-train data=hippocampus "data.root=$dataset" "data.fold=$fold" \
                "sharing=$scheme" "trainer.max_epochs=$epochs" "trainer.val_every=$epochs" \
                trainer.progress=false "hydra.run.dir=$run" "$@"
        done
    done
fi
if [[ $stage == all || $stage == crossval ]]; then
    configs=()
    for scheme in "${schemes[@]}"; do configs+=("$scheme:$(runs_of "$scheme")"); done
    joined=$(IFS=,; echo "${configs[*]}")
    segshare-crossval "runs_by_config={$joined}" "output=$out/crossval" progress=false
fi
if [[ $stage == all || $stage == holdout ]]; then
    # Each fold alone and each scheme's 5-fold ensemble on the held-out cases.
    for scheme in "${schemes[@]}"; do
        for model in "${folds[@]}" ensemble; do
            dir=$out/holdout/$scheme/$model
            [[ -f $dir/summary.json ]] && continue
            path=$out/$scheme/$model
            [[ $model == ensemble ]] && path=$(runs_of "$scheme")
            segshare-predict "model_path=$path" "input=$dataset/imagesTs" \
                "output=$dir/predictions" "hydra.run.dir=$dir/predict"
            segshare-evaluate "pred=$dir/predictions" "ref=$dataset/labelsTs" \
                "dataset_json=$dataset/dataset.json" "output=$dir" progress=false \
                "hydra.run.dir=$dir/evaluate"
        done
    done
    python "$(dirname "$0")/holdout_table.py" "$out/holdout" "${schemes[@]}"
fi
