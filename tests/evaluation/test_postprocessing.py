"""Connected-component postprocessing: the mask operations, the steps and the CV decision."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segshare.evaluation.metrics import nanmean
from segshare.evaluation.overlap import overlap_metrics
from segshare.evaluation.postprocessing import (
    PostprocessingStep,
    apply_postprocessing,
    candidate_thresholds,
    decide_postprocessing,
    keep_largest_component,
    load_postprocessing,
    remove_small_components,
    save_postprocessing,
)

from .conftest import save_label

SHAPE = (19, 20, 21)  # odd sizes catch axis mix-ups


def box(volume: np.ndarray, start, size, value=1) -> np.ndarray:
    """Sets a box of ``volume`` to ``value`` in place and returns ``volume``."""
    volume[tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))] = value
    return volume


def fg_step(*labels) -> PostprocessingStep:
    return PostprocessingStep("largest_component", labels)


# ---------------------------------------------------------------- mask operations


def test_keep_largest_component_keeps_the_big_blob():
    mask = box(np.zeros(SHAPE, bool), (2, 2, 2), (6, 6, 6))
    big = mask.copy()
    box(mask, (14, 14, 14), (2, 2, 2))
    out = keep_largest_component(mask)
    assert out.dtype == bool and out.shape == SHAPE
    np.testing.assert_array_equal(out, big)
    assert mask.sum() == 216 + 8  # input untouched


def test_keep_largest_component_is_26_connected():
    mask = np.zeros(SHAPE, np.uint8)  # 0/1 input works too
    for i in range(3):  # a diagonal chain: one component only with full connectivity
        mask[i, i, i] = 1
    box(mask, (10, 10, 10), (1, 1, 2))  # two face neighbours
    out = keep_largest_component(mask)
    assert out.sum() == 3 and out[0, 0, 0] and out[2, 2, 2] and not out[10, 10, 10]


def test_keep_largest_component_empty_and_2d():
    empty = keep_largest_component(np.zeros(SHAPE, bool))
    assert empty.shape == SHAPE and not empty.any()
    plane = np.zeros((5, 7), bool)
    plane[0, 0] = plane[1, 1] = plane[4, 5] = True  # 8-connected in 2D
    assert keep_largest_component(plane).sum() == 2


def test_remove_small_components_threshold_is_exclusive():
    mask = box(np.zeros(SHAPE, bool), (1, 1, 1), (6, 6, 6))
    box(mask, (10, 10, 10), (2, 2, 2))  # 8 voxels
    mask[17, 2, 18] = True  # 1 voxel
    assert remove_small_components(mask, 8).sum() == 216 + 8
    assert remove_small_components(mask, 9).sum() == 216
    assert remove_small_components(mask, 0).sum() == mask.sum()
    assert remove_small_components(mask, 1000).sum() == 0
    assert remove_small_components(mask, 2).dtype == bool
    with pytest.raises(ValueError, match="min_voxels must be >= 0, got -1"):
        remove_small_components(mask, -1)
    with pytest.raises(ValueError, match="min_voxels must be an integer"):
        remove_small_components(mask, 2.5)


# ---------------------------------------------------------------- steps


def test_step_round_trip_and_validation():
    for step in (fg_step(1, 2), PostprocessingStep("remove_small", (2,), 5)):
        assert PostprocessingStep.from_dict(json.loads(json.dumps(step.to_dict()))) == step
    assert fg_step(1, 2).to_dict() == {"kind": "largest_component", "labels": [1, 2]}
    assert PostprocessingStep("largest_component", [np.int64(3)]).labels == (3,)
    with pytest.raises(ValueError, match="unknown step kind 'dilate'"):
        PostprocessingStep("dilate", (1,))
    with pytest.raises(ValueError, match="remove_small needs min_voxels"):
        PostprocessingStep("remove_small", (1,))
    with pytest.raises(ValueError, match="largest_component takes no min_voxels"):
        PostprocessingStep("largest_component", (1,), 3)
    with pytest.raises(ValueError, match="positive integers"):
        PostprocessingStep("largest_component", (0,))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint32])
def test_apply_postprocessing_preserves_dtype_shape_and_input(dtype):
    label_map = box(np.zeros(SHAPE, dtype), (2, 2, 2), (6, 6, 6), 1)
    box(label_map, (8, 2, 2), (4, 6, 6), 2)  # label 2 touches label 1: one foreground blob
    box(label_map, (15, 15, 15), (2, 2, 2), 2)  # spurious island of label 2
    box(label_map, (2, 15, 2), (1, 1, 1), 1)  # spurious island of label 1
    box(label_map, (15, 2, 15), (2, 2, 2), 3)  # a label the steps do not name
    original = label_map.copy()
    out = apply_postprocessing(label_map, [fg_step(1, 2)])
    assert out.dtype == dtype and out.shape == SHAPE
    np.testing.assert_array_equal(label_map, original)
    want = original.copy()
    want[15:17, 15:17, 15:17] = 0
    want[2, 15, 2] = 0
    np.testing.assert_array_equal(out, want)
    # per label: label 1 alone is one blob plus the island; label 3 is untouched throughout
    out = apply_postprocessing(label_map, [fg_step(1), PostprocessingStep("remove_small", (2,), 9)])
    assert (out == 1).sum() == 216 and (out == 2).sum() == 144 and (out == 3).sum() == 8
    assert apply_postprocessing(label_map, []).tolist() == original.tolist()
    with pytest.raises(TypeError, match="integer label map"):
        apply_postprocessing(label_map.astype(np.float32), [])


# ---------------------------------------------------------------- decision


def two_label_ref(shift: int = 0) -> np.ndarray:
    """Label 1 and label 2 side by side (one foreground component)."""
    ref = box(np.zeros(SHAPE, np.uint8), (2 + shift, 3, 3), (6, 7, 6), 1)
    return box(ref, (8 + shift, 3, 3), (4, 7, 6), 2)


def with_islands(ref: np.ndarray, seed: int) -> np.ndarray:
    """``ref`` plus 1-2 voxel islands of both labels away from the objects."""
    pred = ref.copy()
    rng = np.random.default_rng(seed)
    for label in (1, 2):
        i, j = rng.integers(0, 3, 2)
        box(pred, (15 + i, 14 + j, 2 + 8 * label), (1, 1, 1 + label % 2), label)
    return pred


def recompute(cases, steps, labels) -> dict[str, float]:
    """Per-label nanmean Dice of the cases after ``steps``, the slow way."""
    scores = {k: [] for k in labels}
    for pred, ref in cases:
        metrics = overlap_metrics(apply_postprocessing(pred, steps), ref, labels)
        for k in labels:
            scores[k].append(metrics[k]["Dice"])
    return {str(k): nanmean(v) for k, v in scores.items()}


def test_decision_keeps_largest_component_against_islands():
    cases = [(with_islands(two_label_ref(s), s), two_label_ref(s)) for s in range(3)]
    decision = decide_postprocessing(cases, [1, 2], num_workers=1, progress=False)
    assert decision["steps"] == [fg_step(1, 2).to_dict()]
    first = decision["tried"][0]
    assert first["kind"] == "largest_component" and first["labels"] == [1, 2] and first["kept"]
    assert first["dice_after"] > first["dice_before"]
    assert decision["foreground_dice_after"] == pytest.approx(1.0)
    assert decision["foreground_dice_before"] < 1.0
    # on top of it the per-label steps change nothing, so they are not kept
    assert [t["kept"] for t in decision["tried"][1:]] == [False] * (len(decision["tried"]) - 1)
    assert decision["num_cases"] == 3 and decision["labels"] == [1, 2]
    assert json.loads(json.dumps(decision)) == decision


def test_decision_rejects_largest_component_on_two_true_components():
    ref = box(np.zeros(SHAPE, np.uint8), (1, 1, 1), (5, 5, 5), 1)
    box(ref, (11, 11, 11), (4, 5, 5), 1)  # a second true component of similar size
    pred = ref.copy()
    pred[1, 1, 1] = 0  # not perfect, so that Dice < 1 before
    decision = decide_postprocessing([(pred, ref)] * 2, [1], num_workers=1, progress=False)
    assert decision["steps"] == []
    first = decision["tried"][0]
    assert not first["kept"] and first["dice_after"] < first["dice_before"]
    assert decision["foreground_dice_after"] == decision["foreground_dice_before"]
    assert all(t["kind"] != "largest_component" for t in decision["tried"][1:])  # one label


def test_decision_per_label_step_when_foreground_step_hurts():
    """Labels apart: the whole-foreground step would delete label 2; label 1 has an island."""
    ref = box(np.zeros(SHAPE, np.uint8), (1, 1, 1), (6, 6, 6), 1)
    box(ref, (11, 11, 11), (5, 5, 5), 2)
    pred = ref.copy()
    pred[17, 1, 18] = pred[17, 2, 18] = 1
    empty_2 = np.where(ref == 2, 0, ref).astype(np.uint8)  # a case without label 2: Dice NaN
    cases = [(pred, ref), (pred, ref), (np.where(pred == 2, 0, pred).astype(np.uint8), empty_2)]
    decision = decide_postprocessing(cases, [2, 1], num_workers=1, progress=False)
    assert decision["labels"] == [1, 2]
    assert decision["steps"] == [fg_step(1).to_dict()]
    per_label = {(t["kind"], tuple(t["labels"])): t for t in decision["tried"]}
    assert not per_label[("largest_component", (1, 2))]["kept"]
    assert per_label[("largest_component", (1,))]["kept"]
    assert not per_label[("largest_component", (2,))]["kept"]
    assert decision["per_label_dice_after"] == pytest.approx(recompute(cases, [fg_step(1)], [1, 2]))
    assert decision["per_label_dice_before"] == pytest.approx(recompute(cases, [], [1, 2]))
    assert decision["per_label_dice_after"]["2"] == 1.0  # the NaN case is skipped
    check_tried(decision, cases)


def check_tried(decision, cases) -> None:
    """Every ``tried`` entry's ``dice_after`` equals applying the steps the slow way."""
    labels = decision["labels"]
    kept = [PostprocessingStep.from_dict(s) for s in decision["steps"]]
    for entry in decision["tried"]:
        fields = {k: v for k, v in entry.items() if k in ("kind", "labels", "min_voxels")}
        step = PostprocessingStep.from_dict(fields)
        if len(step.labels) > 1:
            assert entry["dice_after"] == pytest.approx(
                np.mean(list(recompute(cases, [step], labels).values()))
            )
            continue
        prior = [s for s in kept if s.kind == "largest_component" and s != step]
        prior = [s for s in prior if len(s.labels) > 1 or s.labels == step.labels]
        after = recompute(cases, [*prior, step], labels)[str(step.labels[0])]
        assert entry["dice_after"] == pytest.approx(after, nan_ok=True)


def test_decision_remove_small_is_scored_on_top_of_largest_component():
    """Label 1: two cases with a 90-voxel false island, one with a true 100-voxel second part.

    Largest component wins overall; after it, no threshold helps (without it, 100 would).
    """
    ref_a = box(np.zeros(SHAPE, np.uint8), (1, 1, 1), (6, 6, 6), 1)
    box(ref_a, (1, 12, 12), (4, 4, 4), 2)
    pred_a = box(ref_a.copy(), (13, 1, 1), (3, 5, 6), 1)  # 90 voxels, false
    ref_b = box(ref_a.copy(), (13, 1, 1), (4, 5, 5), 1)  # 100 voxels, true
    cases = [(pred_a, ref_a), (pred_a, ref_a), (ref_b, ref_b)]
    decision = decide_postprocessing(cases, [1, 2], num_workers=1, progress=False)
    assert decision["steps"] == [fg_step(1).to_dict()]
    assert decision["smallest_reference_component"] == {"1": 100, "2": 64}
    small = [t for t in decision["tried"] if t["kind"] == "remove_small" and t["labels"] == [1]]
    assert [t["min_voxels"] for t in small] == [10, 25, 50, 100]
    assert not any(t["kept"] for t in small)
    check_tried(decision, cases)
    assert decision["per_label_dice_after"] == pytest.approx(recompute(cases, [fg_step(1)], [1, 2]))


def test_decision_remove_small_thresholds_from_the_references():
    ref = box(np.zeros(SHAPE, np.uint8), (1, 1, 1), (4, 4, 4), 1)  # 64 voxels
    box(ref, (10, 10, 10), (3, 3, 3), 1)  # 27 voxels: the smallest reference component
    pred = ref.copy()
    box(pred, (16, 2, 16), (1, 1, 2), 1)  # 2-voxel islands
    box(pred, (2, 16, 16), (2, 1, 1), 1)
    decision = decide_postprocessing([(pred, ref)] * 3, [1], num_workers=1, progress=False)
    assert decision["smallest_reference_component"] == {"1": 27}
    small = [t for t in decision["tried"] if t["kind"] == "remove_small"]
    assert [t["min_voxels"] for t in small] == candidate_thresholds(27, (0.1, 0.25, 0.5, 1.0))
    assert [t["min_voxels"] for t in small] == [2, 6, 13, 27]
    assert [t["kept"] for t in small] == [False, True, False, False]  # smallest of the best
    assert small[0]["dice_after"] == small[0]["dice_before"]  # 2 removes no 2-voxel island
    assert decision["steps"] == [{"kind": "remove_small", "labels": [1], "min_voxels": 6}]
    assert decision["per_label_dice_after"]["1"] == 1.0
    assert not decision["tried"][0]["kept"]  # largest component would drop a true one


def test_decision_no_remove_small_when_it_does_not_help():
    ref = box(np.zeros(SHAPE, np.uint8), (1, 1, 1), (4, 4, 4), 1)
    box(ref, (10, 10, 10), (3, 3, 3), 1)
    pred = ref.copy()
    pred[1, 1, 1] = 0
    decision = decide_postprocessing([(pred, ref)], [1], num_workers=1, progress=False)
    assert decision["steps"] == []
    assert decision["foreground_dice_after"] == decision["foreground_dice_before"]
    assert candidate_thresholds(1, (0.5, 1.0)) == [] and candidate_thresholds(0, (1.0,)) == []


def test_decision_from_nifti_paths_in_workers(tmp_path):
    cases, files = [], []
    for s in range(3):
        ref, pred = two_label_ref(s), with_islands(two_label_ref(s), s)
        cases.append((pred, ref))
        files.append(
            (
                save_label(pred, tmp_path / f"pred_{s}.nii.gz"),
                save_label(ref, tmp_path / f"ref_{s}.nii.gz"),
            )
        )
    from_files = decide_postprocessing(files, [1, 2], num_workers=2, progress=False)
    assert from_files == decide_postprocessing(cases, [1, 2], num_workers=1, progress=False)


def test_decision_refuses_bad_input(tmp_path):
    ref = save_label(two_label_ref(), tmp_path / "ref.nii.gz")
    pred = save_label(np.zeros((5, 5, 5), np.uint8), tmp_path / "pred.nii.gz")
    with pytest.raises(ValueError, match="pred.nii.gz' has shape .* reference '.*ref.nii.gz'"):
        decide_postprocessing([(pred, ref)], [1], num_workers=1, progress=False)
    with pytest.raises(ValueError, match="missing.nii.gz"):
        decide_postprocessing([(tmp_path / "missing.nii.gz", ref)], [1], progress=False)
    with pytest.raises(ValueError, match="at least one case"):
        decide_postprocessing([], [1])
    with pytest.raises(ValueError, match="positive integers"):
        decide_postprocessing([(pred, ref)], [0, 1])
    with pytest.raises(ValueError, match="size_fractions"):
        decide_postprocessing([(pred, ref)], [1], size_fractions=(0.5, 2.0))


# ---------------------------------------------------------------- files


def test_save_load_round_trip(tmp_path):
    cases = [(with_islands(two_label_ref(s), s), two_label_ref(s)) for s in range(2)]
    decision = decide_postprocessing(cases, [1, 2], num_workers=1, progress=False)
    decision["steps"].append({"kind": "remove_small", "labels": [2], "min_voxels": 4})
    path = save_postprocessing(decision, tmp_path / "pp" / "postprocessing.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["postprocessing.json"]  # no temp
    assert json.loads(path.read_text()) == decision
    steps = load_postprocessing(path)
    assert steps == [fg_step(1, 2), PostprocessingStep("remove_small", (2,), 4)]
    with pytest.raises(ValueError, match="unknown step kind"):
        save_postprocessing({"format": 1, "steps": [{"kind": "x", "labels": [1]}]}, path)
    assert load_postprocessing(path) == steps  # the refused save left the file alone


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "top level must be an object"),
        ('{"steps": []}', "unknown format None"),
        ('{"format": 2, "steps": []}', "unknown format 2"),
        ('{"format": 1}', "'steps' must be a list"),
        ('{"format": 1, "steps": [{"kind": "dilate", "labels": [1]}]}', "step 0: unknown step"),
        ('{"format": 1, "steps": [{"kind": "largest_component", "labels": [1.5]}]}', "integers"),
        ('{"format": 1, "steps": [{"kind": "largest_component", "labels": ["1"]}]}', "integers"),
        ('{"format": 1, "steps": [{"kind": "largest_component", "labels": 1}]}', "integers"),
        ('{"format": 1, "steps": [{"kind": "remove_small", "labels": [1]}]}', "needs min_voxels"),
        ('{"format": 1, "steps": [{"labels": [1]}]}', "needs 'kind'"),
        ('{"format": 1, "steps": [7]}', "step 0: a step must be an object"),
    ],
)
def test_load_refuses_invalid_files(tmp_path, content, problem):
    path = tmp_path / "postprocessing.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=problem) as err:
        load_postprocessing(path)
    assert str(path) in str(err.value)


def test_load_refuses_missing_and_unreadable(tmp_path):
    for path, problem in (
        (tmp_path / "absent.json", "does not exist"),
        (tmp_path, "is not a file"),
    ):
        with pytest.raises(ValueError, match=problem) as err:
            load_postprocessing(path)
        assert str(path) in str(err.value)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="binary.json") as err:
        load_postprocessing(binary)
    assert "postprocessing file" in str(err.value)


def test_the_decision_does_not_count_components_in_the_ignored_region():
    from segshare.evaluation.postprocessing import decide_postprocessing

    ref = np.zeros((12, 12, 12), np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    ref[:, :, 9:] = 2  # not annotated (ignore label 2)
    pred = np.zeros_like(ref)
    pred[2:6, 2:6, 2:6] = 1
    pred[1:3, 1:3, 10:12] = 1  # a stray component inside the ignored region only
    cases = [(pred, ref)] * 2
    ignoring = decide_postprocessing(cases, [1], num_workers=1, progress=False, ignore_label=2)
    assert ignoring["foreground_dice_before"] == 1.0 and ignoring["steps"] == []
    counting = decide_postprocessing(
        [(pred, np.where(ref == 2, 0, ref))] * 2, [1], num_workers=1, progress=False
    )
    assert counting["foreground_dice_before"] < 1.0 and counting["steps"]  # it would help
