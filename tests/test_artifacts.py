"""Artifacts: manifest written last, atomic publish, verification on read."""

import hashlib
import json

import pytest

from guilomo.artifacts import ArtifactError, ArtifactWriter, config_hash, read_artifact


def write(dest, **kw):
    with ArtifactWriter(
        dest, kind="Allocation", stage="allocate", config={"b": 1, "a": 2}, **kw
    ) as tmp:
        (tmp / "allocation.json").write_text('{"x": 1}\n')
        (tmp / "plots").mkdir()
        (tmp / "plots" / "a.png").write_bytes(b"\x89PNG fake")
    return dest


def test_roundtrip_checksums_by_hand(tmp_path):
    out = write(tmp_path / "alloc", parents=["s3://b/search"], metadata={"modules": 3})
    m = read_artifact(out, kind="Allocation")
    assert m.files == {
        "allocation.json": hashlib.sha256(b'{"x": 1}\n').hexdigest(),
        "plots/a.png": hashlib.sha256(b"\x89PNG fake").hexdigest(),
    }
    assert (
        m.config_hash
        == hashlib.sha256(json.dumps({"a": 2, "b": 1}, sort_keys=True).encode()).hexdigest()
    )
    assert m.config_hash == config_hash({"a": 2, "b": 1})
    assert m.parents == ["s3://b/search"] and m.stage == "allocate" and m.metadata == {"modules": 3}
    assert list(tmp_path.iterdir()) == [out]  # no temporary folder left


def test_failed_stage_leaves_nothing_and_keeps_old(tmp_path):
    with pytest.raises(RuntimeError):
        with ArtifactWriter(tmp_path / "a", kind="Adapter", stage="sft") as tmp:
            (tmp / "w.safetensors").write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    out = write(tmp_path / "alloc")
    before = read_artifact(out)
    with pytest.raises(RuntimeError):
        with ArtifactWriter(out, kind="Allocation", stage="allocate", overwrite=True) as tmp:
            raise RuntimeError("killed")
    assert read_artifact(out) == before


def test_existing_output_needs_overwrite(tmp_path):
    out = write(tmp_path / "alloc")
    with pytest.raises(ArtifactError, match="already exists"):
        write(out)
    with ArtifactWriter(out, kind="Allocation", stage="allocate", overwrite=True) as tmp:
        (tmp / "allocation.json").write_text("{}")
    assert set(read_artifact(out).files) == {"allocation.json"}
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
        (lambda p: (p / "allocation.json").write_text("{}"), "allocation.json: checksum mismatch"),
        (lambda p: (p / "extra.txt").write_text("x"), r"unexpected \['extra.txt'\]"),
        (lambda p: (p / "plots" / "a.png").unlink(), r"missing \['plots/a.png'\]"),
        (lambda p: (p / "manifest.json").write_text('{"kind": "Model"}'), "invalid manifest: kind"),
    ],
)
def test_reader_refuses_damaged_artifacts(tmp_path, damage, match):
    out = write(tmp_path / "alloc")
    damage(out)
    with pytest.raises(ArtifactError, match=match):
        read_artifact(out)


def test_reader_refuses_wrong_kind_and_missing_folder(tmp_path):
    out = write(tmp_path / "alloc")
    with pytest.raises(ArtifactError, match="holds a Allocation artifact, expected Adapter"):
        read_artifact(out, kind="Adapter")
    with pytest.raises(ArtifactError, match="not a folder"):
        read_artifact(tmp_path / "nope")
