"""Manifest validation: clear one-line errors naming the file and the cause."""

import pytest

from pipeline.manifest import ManifestError, load_manifest

HEADER = "slide_id,slide_path,annotation_path,split,patient_id,slide_label\n"


def _write(tmp_path, body, header=HEADER):
    (tmp_path / "s1.tiff").write_bytes(b"x")
    (tmp_path / "s2.tiff").write_bytes(b"x")
    (tmp_path / "a1.xml").write_text("<x/>")
    f = tmp_path / "manifest.csv"
    f.write_text(header + body)
    return f


def test_relative_paths_resolve_against_csv_folder(tmp_path):
    f = _write(tmp_path, "s1,s1.tiff,a1.xml,train,p1,macro\ns2,s2.tiff,,test,,\n")
    df = load_manifest(f)
    assert df.loc[0, "slide_path"] == str(tmp_path / "s1.tiff")
    assert df.loc[0, "annotation_path"] == str(tmp_path / "a1.xml")
    assert df.loc[1, "annotation_path"] == ""
    assert df.loc[1, "patient_id"] == "s2"  # defaults to the slide id


def test_optional_columns_may_be_absent(tmp_path):
    header = "slide_id,slide_path,annotation_path,split\n"
    f = _write(tmp_path, "s1,s1.tiff,,train\n", header=header)
    df = load_manifest(f)
    assert list(df["patient_id"]) == ["s1"] and list(df["slide_label"]) == [""]


@pytest.mark.parametrize(
    "header,body,match",
    [
        ("slide_id,slide_path,split\n", "s1,s1.tiff,train\n", "missing column.*annotation_path"),
        (HEADER, "s1,s1.tiff,,train,,\ns1,s2.tiff,,val,,\n", "duplicate slide_id s1"),
        (HEADER, "s1,missing.tiff,,train,,\n", "s1: file not found"),
        (HEADER, "s1,s1.tiff,nope.xml,train,,\n", "annotation not found"),
        (HEADER, "s1,s1.tiff,,training,,\n", "unknown split"),
        (HEADER, "s1,s1.tiff,,train,,big\n", "unknown slide_label"),
        (HEADER, "a/b,s1.tiff,,train,,\n", "slide_id 'a/b'"),
    ],
)
def test_bad_manifests_name_file_and_cause(tmp_path, header, body, match):
    f = _write(tmp_path, body, header=header)
    with pytest.raises(ManifestError, match=match) as exc:
        load_manifest(f)
    assert str(f) in str(exc.value) and "\n" not in str(exc.value)
