"""Prompt files: the bosam format, 3D Slicer markups, MONAI Label prompts, and every error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bosam_cli.errors import PromptError
from bosam_cli.prompts import (
    COORDINATE_SYSTEMS,
    MAX_LABEL,
    MIN_LABEL,
    Click,
    PromptSet,
    click_from,
    load_prompts,
    parse_prompts,
    schema_path,
)
from bosam_cli.volume import Volume

MINIMAL = """{"coordinate_system": "RAS",
 "objects": [{"label": 75, "name": "femur_left",
              "clicks": [{"xyz": [88.5, 31.0, -612.2], "positive": true},
                         {"xyz": [90.1, 35.5, -590.0], "positive": false}]}]}
"""


def axis_aligned_volume() -> Volume:
    """64^3 at 1.5 mm, placed so that the issue's example clicks (around the left femur) are inside."""
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    aff[:3, 3] = [40.0, 0.0, -640.0]
    return Volume(np.zeros((64, 64, 64), np.int16), aff)


def oblique_volume() -> Volume:
    """An oblique, anisotropic, LPS-ish grid (i to the left, j posterior), like many DICOM series."""
    t = np.radians(20.0)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rot @ np.diag([0.8, 0.8, 2.5])
    aff[:3, 3] = [30.0, 60.0, -200.0]
    return Volume(np.arange(40 * 50 * 30, dtype=np.int16).reshape(40, 50, 30), aff)


def write(tmp_path: Path, obj, name: str = "prompts.json") -> Path:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def bosam_file(system: str, clicks: list, label: int = 5, **obj_extra) -> dict:
    return {"coordinate_system": system, "objects": [{"label": label, "clicks": clicks, **obj_extra}]}


# ---------------------------------------------------------------------------------------------
# the bosam format


def test_minimal_form_as_written(tmp_path):
    vol = axis_aligned_volume()
    ps = load_prompts(write(tmp_path, MINIMAL), vol)
    assert isinstance(ps, PromptSet)
    assert ps.source == str(tmp_path / "prompts.json")
    assert ps.coordinate_system == "RAS" and ps.format == "bosam"
    (obj,) = ps.objects
    assert (obj.label, obj.name) == (75, "femur_left")
    assert [c.positive for c in obj.clicks] == [True, False]
    ras = np.array([[88.5, 31.0, -612.2], [90.1, 35.5, -590.0]])
    np.testing.assert_allclose([c.ras for c in obj.clicks], ras)
    expected_ijk = (ras - [40.0, 0.0, -640.0]) / 1.5  # by hand for this axis-aligned grid
    np.testing.assert_allclose([c.ijk for c in obj.clicks], expected_ijk, atol=1e-9)
    assert all(isinstance(c, Click) and c.ijk.shape == (3,) and c.ras.shape == (3,) for c in obj.clicks)


def test_object_names_are_kept_on_one_line(tmp_path):
    """A line break or tab in a name split the manifest's warnings and tables over lines (and is
    no valid DICOM text): control characters become spaces, runs of white space one."""
    vol = axis_aligned_volume()
    doc = bosam_file("voxel", [{"xyz": [1, 2, 3]}], name="  femur\nleft\t\x1b bone  ")
    (obj,) = load_prompts(write(tmp_path, doc), vol).objects
    assert obj.name == "femur left bone"
    with pytest.raises(PromptError, match="name must be a non-empty string"):
        load_prompts(write(tmp_path, bosam_file("voxel", [{"xyz": [1, 2, 3]}], name="\n\x07"), "bad.json"), vol)


def test_ras_lps_and_voxel_give_the_same_voxel(tmp_path):
    vol = oblique_volume()
    ijk = np.array([10.25, 20.5, 12.75])
    ras = vol.affine[:3, :3] @ ijk + vol.affine[:3, 3]
    lps = ras * [-1, -1, 1]
    results = {}
    for system, xyz in (("RAS", ras), ("LPS", lps), ("voxel", ijk)):
        ps = load_prompts(write(tmp_path, bosam_file(system, [{"xyz": list(map(float, xyz))}]), f"{system}.json"), vol)
        assert ps.coordinate_system == system
        results[system] = ps.objects[0].clicks[0]
    for c in results.values():
        np.testing.assert_allclose(c.ijk, ijk, atol=1e-9)
        np.testing.assert_allclose(c.ras, ras, atol=1e-9)


def test_defaults_order_and_comments(tmp_path):
    vol = axis_aligned_volume()
    doc = {
        "_comment": "comments are keys starting with _",
        "coordinate_system": "voxel",
        "objects": [
            {"label": 3, "clicks": [{"xyz": [1, 2, 3]}, {"xyz": [4, 5, 6], "positive": False}, {"xyz": [7, 8, 9.5]}]},
            {"label": 1, "name": " sacrum ", "clicks": [{"xyz": [10, 10, 10], "_note": "centre"}]},
        ],
    }
    ps = parse_prompts(doc, vol, source="inline")
    assert [o.label for o in ps.objects] == [3, 1]  # file order, not sorted
    assert [o.name for o in ps.objects] == ["object_3", "sacrum"]
    assert [c.positive for c in ps.objects[0].clicks] == [True, False, True]
    np.testing.assert_allclose([c.ijk for c in ps.objects[0].clicks], [[1, 2, 3], [4, 5, 6], [7, 8, 9.5]])


def test_canonical_json_and_records_round_trip(tmp_path):
    vol = oblique_volume()
    doc = bosam_file("voxel", [{"xyz": [10.123456, 20.5, 12.0]}, {"xyz": [11, 21, 13], "positive": False}], label=7, name="L3")
    ps = parse_prompts(doc, vol)
    canon = ps.to_json_dict()
    assert canon["coordinate_system"] == "RAS"
    assert canon["objects"][0]["label"] == 7 and canon["objects"][0]["name"] == "L3"
    assert all(len(str(x).split(".")[-1]) <= 3 for c in canon["objects"][0]["clicks"] for x in c["xyz"])
    again = parse_prompts(json.loads(json.dumps(canon)), vol)
    for a, b in zip(ps.objects[0].clicks, again.objects[0].clicks):
        np.testing.assert_allclose(a.ras, b.ras, atol=1e-3)
        assert a.positive == b.positive
    recs = ps.as_records()
    assert [r["click"] for r in recs] == [0, 1]
    assert set(recs[0]) == {"object", "label", "click", "positive", "ras", "voxel"}
    assert recs[1]["positive"] is False and recs[0]["object"] == "L3" and recs[0]["label"] == 7
    np.testing.assert_allclose(recs[0]["voxel"], [10.123, 20.5, 12.0], atol=1e-3)


def test_outside_points_kept_when_not_checked(tmp_path):
    vol = axis_aligned_volume()
    doc = bosam_file("voxel", [{"xyz": [1, 1, 1]}, {"xyz": [100, 1, 1]}])
    ps = parse_prompts(doc, vol, check_inside=False)
    assert len(ps.objects[0].clicks) == 2
    assert not vol.contains_voxel(ps.objects[0].clicks[1].ijk)[0]


def test_voxel_centre_edges_are_inside():
    vol = axis_aligned_volume()
    ok = parse_prompts(bosam_file("voxel", [{"xyz": [-0.5, 63.5, 0]}]), vol)
    assert ok.objects[0].clicks[0].ijk.tolist() == [-0.5, 63.5, 0.0]
    with pytest.raises(PromptError, match="outside"):
        parse_prompts(bosam_file("voxel", [{"xyz": [-0.51, 0, 0]}]), vol)


# ---------------------------------------------------------------------------------------------
# 3D Slicer markups


def slicer_point(label: str, position, status: str = "defined") -> dict:
    return {"id": label, "label": label, "description": "", "associatedNodeID": "vtkMRMLScalarVolumeNode1",
            "position": list(map(float, position)), "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
            "selected": True, "locked": False, "visibility": True, "positionStatus": status}


def slicer_node(name: str, system: str | None, points: list) -> dict:
    node = {"type": "Fiducial", "name": name, "coordinateUnits": "mm", "locked": False,
            "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d", "lastUsedControlPointNumber": len(points),
            "controlPoints": points, "measurements": [],
            "display": {"visibility": True, "opacity": 1.0, "color": [0.4, 1.0, 1.0], "glyphType": "Sphere3D"}}
    if system is not None:
        node["coordinateSystem"] = system
    return node


def slicer_file(nodes: list) -> dict:
    return {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
            "markups": nodes}


@pytest.mark.parametrize("system", ["LPS", "RAS"])
def test_slicer_markups(tmp_path, system):
    vol = oblique_volume()
    ijk = np.array([[10.0, 20.0, 5.0], [12.0, 22.0, 6.0], [30.0, 40.0, 25.0], [1.0, 2.0, 3.0]])
    ras = vol.voxel_to_world(ijk)
    xyz = ras * ([-1, -1, 1] if system == "LPS" else [1, 1, 1])
    doc = slicer_file([
        slicer_node("L3", system, [slicer_point("L3-1", xyz[0]), slicer_point("-L3-2", xyz[1]),
                                   slicer_point("L3-3", [0, 0, 0], status="undefined")]),
        slicer_node("femur", system, [slicer_point("femur-1", xyz[2]), slicer_point("- background", xyz[3])]),
    ])
    ps = load_prompts(write(tmp_path, doc, "F.mrk.json"), vol)
    assert ps.format == "slicer" and ps.coordinate_system == system
    assert [(o.label, o.name) for o in ps.objects] == [(1, "L3"), (2, "femur")]
    assert [[c.positive for c in o.clicks] for o in ps.objects] == [[True, False], [True, False]]
    got = np.array([c.ijk for o in ps.objects for c in o.clicks])
    np.testing.assert_allclose(got, ijk, atol=1e-9)


def test_slicer_default_system_is_lps_and_unnamed_nodes(tmp_path):
    vol = oblique_volume()
    ras = vol.voxel_to_world([[10.0, 20.0, 5.0]])[0]
    doc = slicer_file([{"type": "Fiducial", "controlPoints": [{"label": "F-1", "position": list(ras * [-1, -1, 1])}]}])
    ps = parse_prompts(doc, vol, source="old.mrk.json")
    assert ps.coordinate_system == "LPS" and ps.objects[0].name == "object_1"
    np.testing.assert_allclose(ps.objects[0].clicks[0].ijk, [10, 20, 5], atol=1e-9)


# ---------------------------------------------------------------------------------------------
# MONAI Label style


def test_monai_single_and_list(tmp_path):
    vol = axis_aligned_volume()
    ps = load_prompts(write(tmp_path, {"label": 3, "foreground": [[1, 2, 3], [4, 5, 6]], "background": [[7, 8, 9]]}), vol)
    assert ps.format == "monai" and ps.coordinate_system == "voxel"
    (o,) = ps.objects
    assert (o.label, o.name) == (3, "object_3")
    assert [c.positive for c in o.clicks] == [True, True, False]
    np.testing.assert_allclose([c.ijk for c in o.clicks], [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    np.testing.assert_allclose(o.clicks[2].ras, vol.voxel_to_world([[7, 8, 9]])[0])

    ps = parse_prompts([{"label": "spleen", "foreground": [[1, 1, 1]]}, {"label": 1, "foreground": [[2, 2, 2]]},
                        {"foreground": [[3, 3, 3]], "name": "x"}], vol)
    assert [(o.label, o.name) for o in ps.objects] == [(2, "spleen"), (1, "object_1"), (3, "x")]


# ---------------------------------------------------------------------------------------------
# click_from (interactive sessions)


def test_click_from():
    vol = oblique_volume()
    ras = vol.voxel_to_world([[5.0, 6.0, 7.0]])[0]
    for system, xyz in (("ras", ras), ("LPS", ras * [-1, -1, 1]), ("Voxel", [5, 6, 7])):
        c = click_from(vol, xyz, system, False)
        assert c.positive is False
        np.testing.assert_allclose(c.ijk, [5, 6, 7], atol=1e-9)
        np.testing.assert_allclose(c.ras, ras, atol=1e-9)
    with pytest.raises(PromptError, match="unknown coordinate system"):
        click_from(vol, [1, 2, 3], "IJK", True)
    with pytest.raises(PromptError, match=r"outside the volume of shape \(40, 50, 30\)"):
        click_from(vol, [400, 2, 3], "voxel", True)
    with pytest.raises(PromptError, match="3 numbers"):
        click_from(vol, [1, 2], "voxel", True)
    assert click_from(vol, (400, 2, 3), "voxel", True, check_inside=False).ijk[0] == 400


# ---------------------------------------------------------------------------------------------
# errors: one line naming the file, the JSON path and the problem


def ok_click(xyz=(10, 10, 10), positive=True) -> dict:
    return {"xyz": list(xyz), "positive": positive}


ERROR_CASES = {
    "invalid-json": ('{"coordinate_system": "RAS", "objects": [', "", "invalid JSON at line 1"),
    "unknown-system": (bosam_file("IJK", [ok_click()]), "coordinate_system", "unknown coordinate system"),
    "lowercase-system": (bosam_file("ras", [ok_click()]), "coordinate_system", "unknown coordinate system"),
    "missing-system": ({"objects": [{"label": 1, "clicks": [ok_click()]}]}, "coordinate_system", "missing"),
    "outside": (bosam_file("voxel", [ok_click(), ok_click((70, 1, 2))]), "objects[0].clicks[1].xyz",
                "voxel (70, 1, 2) lies outside the volume of shape (64, 64, 64)"),
    "outside-ras": (bosam_file("RAS", [ok_click((0.0, 0.0, 0.0))]), "objects[0].clicks[0].xyz",
                    "point (0, 0, 0) RAS mm maps to voxel"),
    "empty-object": (bosam_file("voxel", []), "objects[0].clicks", "empty object"),
    "first-negative": (bosam_file("voxel", [ok_click(positive=False), ok_click()]), "objects[0].clicks[0].positive",
                       "first click of an object must be positive"),
    "duplicate-label": ({"coordinate_system": "voxel", "objects": [{"label": 2, "clicks": [ok_click()]},
                                                                   {"label": 2, "clicks": [ok_click()]}]},
                        "objects[1].label", "duplicate label id 2"),
    "label-string": (bosam_file("voxel", [ok_click()], label="75"), "objects[0].label", "must be an integer"),
    "label-float": (bosam_file("voxel", [ok_click()], label=7.0), "objects[0].label", "must be an integer"),
    "label-bool": (bosam_file("voxel", [ok_click()], label=True), "objects[0].label", "must be an integer"),
    "label-zero": (bosam_file("voxel", [ok_click()], label=0), "objects[0].label", "out of range 1..65535"),
    "label-big": (bosam_file("voxel", [ok_click()], label=65536), "objects[0].label", "out of range"),
    "missing-label": ({"coordinate_system": "voxel", "objects": [{"clicks": [ok_click()]}]}, "objects[0].label", "missing"),
    "xyz-short": (bosam_file("voxel", [{"xyz": [1, 2]}]), "objects[0].clicks[0].xyz", "expected 3 numbers"),
    "xyz-not-list": (bosam_file("voxel", [{"xyz": "1 2 3"}]), "objects[0].clicks[0].xyz", "expected 3 numbers"),
    "xyz-string-item": (bosam_file("voxel", [{"xyz": [1, "2", 3]}]), "objects[0].clicks[0].xyz[1]", "expected a number"),
    "xyz-nan": ('{"coordinate_system": "voxel", "objects": [{"label": 1, "clicks": [{"xyz": [1, 2, NaN]}]}]}',
                "objects[0].clicks[0].xyz[2]", "NaN"),
    "missing-xyz": (bosam_file("voxel", [{"positive": True}]), "objects[0].clicks[0].xyz", "missing"),
    "positive-string": (bosam_file("voxel", [{"xyz": [1, 2, 3], "positive": "yes"}]), "objects[0].clicks[0].positive",
                        "true or false"),
    "unknown-key": (bosam_file("voxel", [ok_click()], clics=[]), "objects[0].clics", "unknown key"),
    "no-objects": ({"coordinate_system": "RAS", "objects": []}, "objects", "no objects"),
    "objects-not-list": ({"coordinate_system": "RAS", "objects": {"label": 1}}, "objects", "expected a list"),
    "object-not-dict": ({"coordinate_system": "RAS", "objects": [5]}, "objects[0]", "expected a JSON object"),
    "name-empty": (bosam_file("voxel", [ok_click()], name=""), "objects[0].name", "non-empty string"),
    "unrecognised": ([1, 2, 3], "(top level)", "unrecognised prompt format"),
    "slicer-line": (slicer_file([{"type": "Line", "controlPoints": []}]), "markups[0].type", "only point lists"),
    "slicer-system": (slicer_file([slicer_node("a", "IJK", [slicer_point("a", [0, 0, 0])])]),
                      "markups[0].coordinateSystem", "unknown coordinate system"),
    "slicer-outside": (slicer_file([slicer_node("a", "RAS", [slicer_point("a", [50, 10, -630]),
                                                              slicer_point("b", [0, 0, 0])])]),
                       "markups[0].controlPoints[1].position", "outside the volume"),
    "slicer-empty": (slicer_file([slicer_node("a", "RAS", [slicer_point("a", [1, 1, 1], status="undefined")])]),
                     "markups[0].controlPoints", "empty object"),
    "slicer-first-negative": (slicer_file([slicer_node("a", "RAS", [slicer_point("-a", [50, 10, -630])])]),
                              "markups[0].controlPoints", "must be positive"),
    "slicer-units": (slicer_file([dict(slicer_node("a", "RAS", [slicer_point("a", [50, 10, -630])]), coordinateUnits="um")]),
                     "markups[0].coordinateUnits", "expected mm"),
    "monai-background-only": ({"label": 1, "background": [[1, 1, 1]]}, "foreground", "must be positive"),
    "monai-empty": ({"label": 1, "foreground": [], "background": []}, "foreground", "empty object"),
    "monai-outside": ([{"label": 1, "foreground": [[1, 1, 1]]}, {"label": 2, "foreground": [[1, 1, 99]]}],
                      "[1].foreground[0]", "outside the volume"),
    "monai-duplicate": ([{"label": 4, "foreground": [[1, 1, 1]]}, {"label": 4, "foreground": [[2, 2, 2]]}],
                        "[1].label", "duplicate label id 4"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_prompt_errors_name_file_path_and_problem(tmp_path, case):
    doc, jpath, problem = ERROR_CASES[case]
    path = write(tmp_path, doc, f"{case}.json")
    with pytest.raises(PromptError) as exc:
        load_prompts(path, axis_aligned_volume())
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: "), msg
    if jpath:
        assert f": {jpath}: " in msg, msg
    assert problem in msg, msg


@pytest.mark.parametrize("text, message", [
    ('{"coordinate_system": "voxel", "coordinate_system": "RAS", "objects": []}',
     "key 'coordinate_system' appears twice in one JSON object"),
    ('{"coordinate_system": "voxel", "objects": [{"label": 1, "label": 2, "clicks": [{"xyz": [1, 1, 1]}]}]}',
     "key 'label' appears twice"),
    ("[" * 100000 + "]" * 100000, "not a usable JSON prompt file (RecursionError)"),
    ('{"coordinate_system": "voxel", "objects": [{"label": 1, "clicks": [{"xyz": [1' + "0" * 400 + ', 1, 1]}]}]}',
     "objects[0].clicks[0].xyz[0]: coordinate is 10000000000000000000 (NaN, infinite or beyond any float)"),
])
def test_hostile_json_is_one_line(tmp_path, text, message):
    """Duplicate keys (which one was meant?), nesting beyond the parser and numbers beyond any
    float: a PromptError naming the file, never a traceback."""
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(PromptError) as err:
        load_prompts(path, axis_aligned_volume())
    assert str(err.value).startswith(f"{path}") and message in str(err.value) and "\n" not in str(err.value)


def test_missing_and_non_utf8_files(tmp_path):
    vol = axis_aligned_volume()
    with pytest.raises(PromptError, match=r"absent\.json: no such file"):
        load_prompts(tmp_path / "absent.json", vol)
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'{"name": "\xe9"}')
    with pytest.raises(PromptError, match="not UTF-8"):
        load_prompts(bad, vol)


# ---------------------------------------------------------------------------------------------
# the shipped JSON Schema


def test_schema_is_shipped_and_matches_the_parser():
    schema = json.loads(schema_path().read_text())
    assert schema["properties"]["coordinate_system"]["enum"] == list(COORDINATE_SYSTEMS)
    label = schema["$defs"]["object"]["properties"]["label"]
    assert (label["minimum"], label["maximum"]) == (MIN_LABEL, MAX_LABEL)
    assert set(schema["required"]) == {"coordinate_system", "objects"}
    assert schema["$defs"]["click"]["required"] == ["xyz"]
    from importlib import resources

    assert resources.files("bosam_cli").joinpath("schemas/prompts.schema.json").is_file()


def test_schema_validates_the_minimal_form():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed; the parser tests cover the rules")
    schema = json.loads(schema_path().read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    assert not list(v.iter_errors(json.loads(MINIMAL)))
    bad_first = bosam_file("RAS", [ok_click(positive=False)])
    assert list(v.iter_errors(bad_first))
    assert list(v.iter_errors(bosam_file("IJK", [ok_click()])))
