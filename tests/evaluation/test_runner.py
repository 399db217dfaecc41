"""The folder runner on the data layer: label names from dataset.json, case order in workers."""

from __future__ import annotations

import json
import re

import pytest

from segshare.data.discovery import parse_labels
from segshare.evaluation.runner import load_label_names, match_cases, run_cases

from .conftest import blob_labels, save_label

NNUNET = {"background": 0, "left": 1, "right": 2, "whole": [1, 2]}  # with a region label
MSD = {"0": "background", "1": "left", "2": "right"}


def test_parse_labels_reads_both_layouts():
    want = {"background": 0, "left": 1, "right": 2}
    assert parse_labels(MSD, "d.json") == want
    assert parse_labels(NNUNET, "d.json") == want  # the region label is skipped
    problems: list[tuple[str, str]] = []
    assert parse_labels(NNUNET, "d.json", problems) == want
    assert len(problems) == 1 and problems[0][0] == "d.json"
    assert "label 'whole': [1, 2] is a region" in problems[0][1]
    assert "needs 'regions_class_order'" in problems[0][1]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"background": 0, "a": 1.5}, r"label 'a': 1.5 is not an integer value"),
        ({"background": 0, "a": True}, r"label 'a': True is not an integer value"),
        ({"background": 0, "a": "one"}, r"label 'a': 'one' is not an integer value"),
        ({"background": 0, "a": 1, "b": 1}, r"labels \['a', 'b'\] all have the value 1"),
        (
            {"background": 0, "ignore": 1, "a": 2},
            r"label 'ignore' has the value 1, but the ignore label must have the highest value",
        ),
    ],
)
def test_labels_segshare_cannot_honour_are_refused_naming_the_key(labels, message):
    problems: list[tuple[str, str]] = []
    parse_labels(labels, "d.json", problems)
    assert len(problems) == 1 and problems[0][0] == "d.json"
    assert re.search(message, problems[0][1]), problems[0][1]
    with pytest.raises(ValueError, match="d.json: " + message):
        parse_labels(labels, "d.json")  # evaluation: raised


def test_regions_with_a_class_order_are_refused_as_not_built():
    problems: list[tuple[str, str]] = []
    regions = {"background": 0, "whole tumor": [1, 2, 3], "enhancing": 3}
    assert parse_labels(regions, "d.json", problems, regions_class_order=[1, 2, 3]) == {
        "background": 0,
        "enhancing": 3,
    }
    assert "'whole tumor': [1, 2, 3] is a region" in problems[0][1]
    assert "region-based training is not built yet" in problems[0][1]
    assert "needs 'regions_class_order'" not in problems[0][1]


def test_the_ignore_label_is_kept_and_split_off():
    from segshare.data.discovery import split_ignore_label

    labels = parse_labels({"0": "background", "1": "a", "2": "ignore"}, "d.json")
    assert labels == {"background": 0, "a": 1, "ignore": 2}
    assert split_ignore_label(labels) == ({"background": 0, "a": 1}, 2)
    assert split_ignore_label({"background": 0}) == ({"background": 0}, None)


def test_parse_labels_non_mapping():
    problems: list[tuple[str, str]] = []
    assert parse_labels([1, 2], "d.json", problems) == {}
    assert problems == [("d.json", "'labels' must be a mapping, got [1, 2]")]
    with pytest.raises(ValueError, match="d.json: 'labels' must be a mapping"):
        parse_labels([1, 2], "d.json")


@pytest.mark.parametrize("labels", [NNUNET, MSD])
def test_load_label_names_both_layouts(tmp_path, labels):
    ref = tmp_path / "labelsTr"
    ref.mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    assert load_label_names(ref) == {0: "background", 1: "left", 2: "right"}


def test_load_label_names_errors_name_the_file(tmp_path):
    assert load_label_names(tmp_path) == {}
    bad = tmp_path / "dataset.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read labels from '.*dataset.json': not valid"):
        load_label_names(tmp_path)
    bad.write_text(json.dumps({"labels": ["left"]}))
    with pytest.raises(ValueError, match="cannot read labels from .*must be a mapping"):
        load_label_names(tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset_json not found"):
        load_label_names(tmp_path, tmp_path / "other.json")


def test_run_cases_in_workers_keeps_task_order(label_folders, tmp_path):
    pred = label_folders["pred"]
    save_label(blob_labels(shape=(61, 62, 63)), label_folders["ref"] / "case_0.nii.gz")
    save_label(blob_labels(shape=(61, 62, 63)), pred / "case_0.nii.gz")  # the slowest case first
    match = match_cases(pred, label_folders["ref"])
    common = {"labels": [1, 2], "nsd_tolerance_mm": 1.0, "hd95": "monai"}
    tasks = [dict(case_id=c, ref_path=r, pred_path=p, **common) for c, r, p in match.pairs]
    cases = run_cases(tasks, num_workers=2, progress=False)
    assert [c["case_id"] for c in cases] == ["case_0", "case_1", "case_2"]
    assert cases[0]["num_voxels"] == 61 * 62 * 63
