"""A ``.keras`` archive whose JSON members are huge is refused from the zip directory, before
anything is decompressed or handed to Keras."""

from __future__ import annotations

import zipfile

import keras
import pytest

from segshare.inference import model_io
from segshare.inference.model_io import MAX_JSON_MEMBER_BYTES, load_model_safely

from .conftest import threshold_model


def _with_huge_member(src, dst, member: str, size: int) -> None:
    """Copy the archive ``src`` to ``dst`` with ``member`` replaced by ``size`` bytes of JSON."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            if info.filename != member:
                new.writestr(info, old.read(info))
        with new.open(member, "w") as fh:  # streamed: a few KiB compressed
            fh.write(b'{"pad": "')
            chunk = b" " * 2**20
            for _ in range(size // len(chunk)):
                fh.write(chunk)
            fh.write(b'"}')


@pytest.mark.parametrize("member", ["config.json", "metadata.json"])
def test_a_huge_json_member_is_refused_before_loading(tmp_path, monkeypatch, member):
    assert MAX_JSON_MEMBER_BYTES == 64 * 2**20
    good = tmp_path / "good.keras"
    threshold_model().save(good)
    bad = tmp_path / "model.keras"
    _with_huge_member(good, bad, member, MAX_JSON_MEMBER_BYTES + 2**20)
    assert bad.stat().st_size < 2**20

    def never(*args, **kwargs):
        raise AssertionError("Keras was asked to load an oversized archive")

    monkeypatch.setattr(keras.saving, "load_model", never)
    monkeypatch.setattr(model_io.json, "loads", never)  # not even parsed
    with pytest.raises(ValueError, match=member) as info:
        load_model_safely(bad)
    message = str(info.value)
    assert str(bad) in message and "MiB" in message and "\n" not in message


def test_a_normal_archive_still_loads(tmp_path):
    path = tmp_path / "model.keras"
    threshold_model().save(path)
    assert load_model_safely(path).count_params() == threshold_model().count_params()
