"""The folder runner on the data layer: label names from dataset.json, case order in workers."""

from __future__ import annotations

import json
import re

import pytest

from segshare.data.discovery import parse_labels, parse_regions
from segshare.evaluation.runner import (
    load_label_definitions,
    load_label_names,
    match_cases,
    run_cases,
)

from .conftest import blob_labels, save_label

NNUNET = {"background": 0, "left": 1, "right": 2, "whole": [1, 2]}  # with a region label
MSD = {"0": "background", "1": "left", "2": "right"}


def test_parse_labels_reads_both_layouts():
    want = {"background": 0, "left": 1, "right": 2}
    assert parse_labels(MSD, "d.json") == want
    problems: list[tuple[str, str]] = []
    assert parse_labels(NNUNET, "d.json", problems) == want
    assert len(problems) == 1 and problems[0][0] == "d.json"
    assert "label 'whole': [1, 2] is a region" in problems[0][1]
    assert "needs 'regions_class_order'" in problems[0][1]
    with pytest.raises(ValueError, match="is a region"):
        parse_labels(NNUNET, "d.json")  # evaluation refuses it too, never half-reads it


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


BRATS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing": 3}


def test_regions_with_a_class_order_are_read():
    labels, regions, order = parse_regions(BRATS, [1, 2, 3], "d.json", None)
    assert labels == {"background": 0, "label 1": 1, "label 2": 2, "label 3": 3}
    assert regions == {"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing": [3]}
    assert order == [1, 2, 3]
    with_ignore = parse_regions({**BRATS, "ignore": 4}, [1, 2, 3], "d.json", None)
    assert with_ignore[0]["ignore"] == 4 and "ignore" not in with_ignore[1]


@pytest.mark.parametrize(
    ("labels", "order", "message"),
    [
        (BRATS, [1, 2], r"'regions_class_order' must list one positive integer per region \(3"),
        (BRATS, None, r"'regions_class_order' must list one positive integer per region"),
        (BRATS, [1, 2, 0], r"'regions_class_order' must list one positive integer"),
        ({**BRATS, "core": [3, 2]}, [1, 2, 3, 4], r"regions \['tumor core', 'core'\] all have"),
        ({"background": 0, "a": []}, [1], r"region 'a': \[\] must be a positive integer"),
        ({"background": 0, "a": [0, 1]}, [1], r"region 'a': \[0, 1\] must be a positive"),
        ({"background": 0, "a": 1.5}, [1], r"region 'a': 1.5 must be a positive integer"),
        ({"a": [1]}, [1], r"labels need 'background': 0"),
        ({**BRATS, "ignore": 2}, [1, 2, 3], r"label 'ignore' has the value 2, but the ignore"),
    ],
)
def test_regions_segshare_cannot_honour_are_refused(labels, order, message):
    problems: list[tuple[str, str]] = []
    parse_regions(labels, order, "d.json", problems)
    assert problems and problems[0][0] == "d.json"
    assert re.search(message, problems[0][1]), problems
    with pytest.raises(ValueError, match="d.json: "):
        parse_regions(labels, order, "d.json", None)


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


@pytest.mark.parametrize("labels", [{k: v for k, v in NNUNET.items() if k != "whole"}, MSD])
def test_load_label_names_both_layouts(tmp_path, labels):
    ref = tmp_path / "labelsTr"
    ref.mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    assert load_label_names(ref) == {0: "background", 1: "left", 2: "right"}


def test_load_label_definitions_reads_regions(tmp_path):
    (tmp_path / "dataset.json").write_text(
        json.dumps({"labels": BRATS, "regions_class_order": [1, 2, 3]})
    )
    names, regions = load_label_definitions(tmp_path)
    assert names == {0: "background", 1: "label 1", 2: "label 2", 3: "label 3"}
    assert regions == {"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing": [3]}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": BRATS}))
    with pytest.raises(ValueError, match="needs 'regions_class_order'"):
        load_label_definitions(tmp_path)


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
