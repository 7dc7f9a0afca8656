"""bosam evaluate: metrics, both protocols, the threshold baseline, outputs and the CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bone_datasets import FEMUR, L3, make_dataset, paint_case, save_nifti
from bosam_cli.baseline import ThresholdSegmenter
from bosam_cli.clicks import first_click
from bosam_cli.data import scan_dataset
from bosam_cli.evaluate import (
    CropSegmenter,
    EvaluateOptions,
    croporpad_start,
    dice_score,
    evaluate,
    run_bosam_protocol,
    run_clicks_protocol,
    summarise,
    surface_dice,
    upsample_lowres,
)
from bosam_cli.volume import Volume


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("eval") / "ds", 2)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from bosam_cli.phantom import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("evalph") / "ph", [3], shape=(48, 48, 40), spacing_mm=(3.0, 3.0, 3.0))


def _bosam(*args: str, columns: int = 200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bosam_cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": str(columns), "OMP_NUM_THREADS": "1"})


class OracleSegmenter:
    """A perfect segmenter with the Session surface: the mask is the truth of the label, read
    from the case's label file (found by the image path); records the clicks it gets."""

    def __init__(self, scan, good_from: int = 1) -> None:
        self.truth = {str(i.case.image): i.case.label for i in scan.infos}
        self.clicks: list[tuple[int, tuple[int, ...], bool]] = []
        self.good_from = good_from

    def set_volume(self, volume: Volume) -> None:
        from bosam_cli.volume import read_volume

        self.labels = read_volume(self.truth[str(volume.path)]).array
        self.n = 0

    def reset(self, label=None) -> None:
        self.n = 0

    def add_click(self, label, voxel=None, xyz=None, positive=True):
        self.clicks.append((label, tuple(int(v) for v in voxel), positive))
        self.n += 1
        return None

    def mask(self, label):
        if self.n < self.good_from:  # empty until click ``good_from``
            return np.zeros(self.labels.shape, bool)
        return self.labels == label


# ---------------------------------------------------------------------------------------------
# metrics


def test_dice_and_surface_dice_are_spacing_aware():
    gt = np.zeros((40, 40, 40), bool)
    gt[10:30, 10:30, 10:30] = True
    moved = np.roll(gt, 3, axis=0)
    assert dice_score(gt, gt) == 1.0 and dice_score(gt, np.zeros_like(gt)) == 0.0
    assert dice_score(moved, gt) == pytest.approx(2 * 17 / 40)
    assert surface_dice(gt, gt, (1, 1, 1)) == 1.0
    assert surface_dice(np.zeros_like(gt), gt, (1, 1, 1)) == 0.0
    # 3 voxels apart: beyond 2 mm at 1 mm spacing, within it at 0.5 mm along that axis
    at_1mm = surface_dice(moved, gt, (1.0, 1.0, 1.0))
    assert 0.3 < at_1mm < 0.95
    assert surface_dice(moved, gt, (0.5, 1.0, 1.0)) == 1.0
    assert surface_dice(np.roll(gt, 1, axis=2), gt, (1, 1, 1)) == 1.0


def test_upsampling_in_numpy_matches_torch():
    low = np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(low)[None, None], size=(128,) * 3, mode="trilinear",
                                          align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(upsample_lowres(low, 128), ref, atol=1e-5)


def test_croporpad_centring_rule():
    m = np.zeros((128, 128, 128), bool)
    m[10, 100, 3] = True  # a single voxel lands at index 64
    assert croporpad_start(m, 128) == [10 - 64, 100 - 64, 3 - 64]
    m[11, 100, 3] = True  # bbox [10, 12): centre 11, integer -> start 11 - 64
    assert croporpad_start(m, 128)[0] == 11 - 64
    m[12, 100, 3] = True  # bbox [10, 13): centre 11.5 -> 11 -> start 11 - 64
    assert croporpad_start(m, 128)[0] == 11 - 64


# ---------------------------------------------------------------------------------------------
# protocol "clicks"


def test_perfect_segmenter_scores_one_and_needs_one_click(dataset):
    scan = scan_dataset([dataset])
    seg = OracleSegmenter(scan)
    records = run_clicks_protocol(seg, scan, 3)
    assert len(records) == 2 * 2 * 3  # cases x labels x clicks
    assert all(r.dice == 1.0 and r.nsd == 1.0 and r.other_voxels == 0 for r in records)
    assert [r.note for r in records[:3]] == ["", "no error left", "no error left"]
    # the first click is the deepest voxel of the object (mm distance), positive
    info = scan.infos[0]
    from bosam_cli.volume import read_volume

    lab = read_volume(info.case.label)
    want = first_click(lab.array == L3, lab.spacing_mm).ijk
    assert seg.clicks[0] == (L3, want, True)


def test_next_clicks_go_to_the_largest_error_and_are_signed(dataset):
    scan = scan_dataset([dataset], labels=str(FEMUR))
    seg = OracleSegmenter(scan, good_from=3)  # nothing after clicks 1 and 2, right after click 3
    records = run_clicks_protocol(seg, scan, 4, max_cases=1)
    assert [r.dice for r in records] == [0.0, 0.0, 1.0, 1.0]
    assert [r.note for r in records] == ["", "", "", "no error left"]
    # an empty prediction misses the whole object: the next click is positive, at its centre again
    assert [c[2] for c in seg.clicks] == [True, True, True] and seg.clicks[1] == seg.clicks[0]
    summary = summarise(records, [1, 3], "clicks")
    assert summary["overall"]["1"]["dice"] == 0.0 and summary["overall"]["3"]["dice"] == 1.0
    assert list(summary["per_label"]) == [f"{FEMUR} femur_left"]


def test_other_voxels_count_the_mask_in_other_labelled_structures(dataset):
    from bosam_cli.evaluate import markdown_table
    from bosam_cli.volume import read_volume

    scan = scan_dataset([dataset], labels=str(FEMUR))  # evaluates the femur; the label map holds more

    class Greedy(OracleSegmenter):  # the femur plus every other labelled voxel of the case
        def mask(self, label):
            return self.labels > 0

    records = run_clicks_protocol(Greedy(scan), scan, 1, max_cases=1)
    lab = read_volume(scan.infos[0].case.label).array
    (r,) = records
    assert r.other_voxels == int(((lab > 0) & (lab != FEMUR)).sum()) > 0
    assert r.pred_voxels == int((lab > 0).sum()) and r.other_share == pytest.approx(r.other_voxels / r.pred_voxels)
    summary = summarise(records, [1], "clicks")
    assert summary["overall"]["1"]["other"] == pytest.approx(r.other_share)
    assert summary["per_label"][f"{FEMUR} femur_left"]["1"]["other"] == pytest.approx(r.other_share)
    md = markdown_table(summary, "t")
    assert "Other@1" in md and f"{100 * r.other_share:.1f} %" in md

    class Empty(OracleSegmenter):  # predicts nothing: no leak to measure, not a 0 % leak
        def mask(self, label):
            return np.zeros(self.labels.shape, bool)

    (e,) = run_clicks_protocol(Empty(scan), scan, 1, max_cases=1)
    assert e.pred_voxels == 0 and e.other_share is None
    both = summarise([r, e], [1], "clicks")
    assert both["overall"]["1"]["other"] == pytest.approx(r.other_share)  # the empty mask is left out
    assert summarise([e], [1], "clicks")["overall"]["1"]["other"] is None
    assert "n/a" in markdown_table(summarise([e], [1], "clicks"), "t")


def test_tiny_random_model_through_the_segment_session_writes_outputs(phantoms, tmp_path):
    from engines.torch_engine import TorchEngine

    from bosam_cli.model import build_preset

    torch.manual_seed(0)
    engine = TorchEngine(build_preset("tiny"))
    result = evaluate([str(phantoms)], EvaluateOptions(clicks=[1, 2], labels="vertebrae_L1,rib_left_11", max_windows=2),
                      engine=engine, out_dir=tmp_path / "out")
    records = result["records"]
    assert [r.label for r in records] == [31, 31, 102, 102]
    assert all(0.0 <= r.dice <= 1.0 and 0.0 <= r.nsd <= 1.0 and r.seconds > 0 for r in records)
    assert records[0].encoder_s > 0  # the first click paid for the window's embedding
    rows = list(csv.DictReader(open(tmp_path / "out" / "evaluation.csv")))
    assert len(rows) == len(records) and rows[0]["protocol"] == "clicks"
    doc = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert doc["settings"]["segmenter"]["engine"] == "torch" and "clicks' protocol" in doc["settings"]["protocol_definition"]
    assert doc["settings"]["islands"] == "clicked"  # scored as segment runs: detached blobs dropped
    assert doc["settings"]["refine"] == "hu" and doc["settings"]["refine_hu"] == 75.0  # and the rim peeled
    assert set(doc["summary"]["overall"]) == {"1", "2"}
    md = (tmp_path / "out" / "evaluation.md").read_text()
    assert "| label | objects | Dice@1 | NSD@1 | Other@1 | Dice@2 | NSD@2 | Other@2 |" in md and "**mean**" in md


def test_threshold_baseline_segments_phantom_bones(phantoms):
    scan = scan_dataset([phantoms], labels="vertebrae_L1,vertebrae_L2,vertebrae_T12")
    records = run_clicks_protocol(ThresholdSegmenter(threshold_hu=200), scan, 3)
    final = {r.label_name: r.dice for r in records if r.click == 3}
    assert len(final) == 3 and all(d > 0.4 for d in final.values()), final
    # at 3 mm the threshold region of one vertebra runs into its neighbours; the protocol's
    # next clicks are negative ones on that leak, and they cut it off
    l1 = [r for r in records if r.label == 31]
    assert l1[0].pred_voxels > 2 * l1[0].gt_voxels and l1[1].positive is False
    assert l1[2].dice > l1[0].dice + 0.2


def test_baseline_negative_click_cuts_the_leak():
    hu = np.full((40, 20, 20), -100, np.int16)
    hu[5:35, 8:12, 8:12] = 700  # two bones touching end to end: 5..19 and 20..34
    vol = Volume(hu, np.eye(4))
    seg = ThresholdSegmenter(threshold_hu=200, radius_mm=100)
    seg.set_volume(vol)
    seg.add_click(1, voxel=np.array([8, 10, 10]))
    assert seg.mask(1).sum() == 30 * 16  # leaks into the neighbour
    seg.add_click(1, voxel=np.array([31, 10, 10]), positive=False)
    m = seg.mask(1)
    assert m[5:19, 8:12, 8:12].all() and not m[22:35].any()


def test_baseline_positive_click_below_threshold_snaps_and_keeps_its_voxel():
    """A positive click on a low-HU voxel of the bone (marrow, partial volume) grows from the
    nearest bone and the clicked voxel joins the mask: the protocol's next click is not the
    same voxel again."""
    hu = np.full((30, 20, 20), -100, np.int16)
    hu[5:25, 6:14, 6:14] = 700
    hu[12:18, 9:11, 9:11] = 50  # a low-HU core inside the bone
    seg = ThresholdSegmenter(threshold_hu=200, radius_mm=100)
    seg.set_volume(Volume(hu, np.eye(4)))
    seg.add_click(1, voxel=np.array([15, 10, 10]))
    m = seg.mask(1)
    assert m[15, 10, 10] and m[5:25, 6:14, 6:14].all() and m.sum() == 20 * 8 * 8  # the core is filled too
    seg.reset()
    seg.add_click(1, voxel=np.array([15, 2, 2]))  # soft tissue 4+ mm from the bone: snaps, keeps the voxel
    m = seg.mask(1)
    assert m[15, 2, 2] and m[5:25, 6:14, 6:14].all()
    # a click in a one-voxel joint space grows one of the two bones, never both
    joint = np.full((30, 20, 20), -100, np.int16)
    joint[3:14, 5:15, 5:15] = 700
    joint[14, 5:15, 5:15] = 150  # the joint space, below the threshold
    joint[15:26, 5:15, 5:15] = 700
    seg.set_volume(Volume(joint, np.eye(4)))
    seg.add_click(1, voxel=np.array([14, 10, 10]))
    m = seg.mask(1)
    assert m[14, 10, 10] and m[3:14].sum() + m[15:26].sum() == 11 * 10 * 10
    # a noisy bright voxel nearer the click than the bone is passed over
    hu[15, 3, 3] = 400
    seg.set_volume(Volume(hu, np.eye(4)))
    seg.add_click(1, voxel=np.array([15, 2, 2]))
    m = seg.mask(1)
    assert m[15, 2, 2] and m[5:25, 6:14, 6:14].all()


# ---------------------------------------------------------------------------------------------
# protocol "bosam"


def test_bosam_protocol_best_of_n_and_crop(dataset):
    scan = scan_dataset([dataset])
    made = []

    def make(clamp):
        made.append(clamp)
        return ThresholdSegmenter(threshold_hu=200, radius_mm=40)

    records = run_bosam_protocol(make, scan, 4, grid="native", seed=2023)
    assert made == [None, None]  # published clamp rule: only for paths containing '/ct_'
    assert len(records) == 2 * 4 and {r.label for r in records} == {0}
    assert all(r.dice == round(r.dice, 4) for r in records)
    s = summarise(records, [1, 2, 4], "bosam")
    best = [s["best_of_n"][k]["dice"] for k in ("1", "2", "4")]
    assert best == sorted(best) and s["cases"] == 2
    per_case_first = np.mean([r.dice for r in records if r.click == 1])
    assert best[0] == pytest.approx(per_case_first)
    again = run_bosam_protocol(make, scan, 4, grid="native", seed=2023)
    assert [r.dice for r in again] == [r.dice for r in records]  # seeded: reproducible


def test_bosam_crop_first_crops_the_case_around_the_label_box():
    """The published loader crops the case to 128^3 around the label box before the random
    centre is drawn: a bone 280 voxels long only ever shows its central 128 voxels."""
    from bosam_cli.evaluate import bosam_crop

    shape = (300, 40, 40)
    rows = np.broadcast_to(np.arange(shape[0])[:, None, None], shape).astype(np.int16)
    image = Volume(rows, np.eye(4))
    merged = np.zeros(shape, bool)
    merged[10:290, 15:25, 15:25] = True
    seen: set[int] = set()
    for seed in range(40):
        raw, gt, affine = bosam_crop(image, merged, np.random.default_rng(seed), "native", 1.5, 128)
        seen |= set(np.unique(raw[gt]).tolist())
        inside = np.argwhere(gt)
        np.testing.assert_array_equal(raw[gt], (affine @ np.c_[inside, np.ones(len(inside))].T)[0])  # affine follows
    assert min(seen) >= 150 - 64 and max(seen) < 150 + 64 and len(seen) == 128
    two = np.zeros(shape, bool)  # two bones far apart, nothing around the box centre
    two[0:10, 15:25, 15:25] = two[290:300, 15:25, 15:25] = True
    assert bosam_crop(image, two, np.random.default_rng(0), "native", 1.5, 128) is None


def test_bosam_protocol_replacement_cases_are_samples_of_their_own(tmp_path):
    """A case whose first crop holds no bone is replaced by a random case (as published); when
    that case was already evaluated, its second crop is a second sample, not merged into the
    first one's best-of-N."""
    root = tmp_path / "ds"
    aff = np.eye(4)
    ct = np.full((300, 40, 40), -1000, np.int16)
    one = np.zeros(ct.shape, np.uint8)
    one[140:160, 15:25, 15:25] = 1
    apart = np.zeros(ct.shape, np.uint8)
    apart[0:10, 15:25, 15:25] = apart[290:300, 15:25, 15:25] = 1  # nothing near the box centre
    for name, lab in (("a_one", one), ("b_apart", apart)):
        save_nifti(np.where(lab > 0, 700, ct).astype(np.int16), aff, root / "imagesTr" / f"{name}_0000.nii.gz")
        save_nifti(lab, aff, root / "labelsTr" / f"{name}.nii.gz")
    scan = scan_dataset([root])
    records = run_bosam_protocol(lambda clamp: ThresholdSegmenter(threshold_hu=200, radius_mm=40), scan, 2, seed=2023)
    keys = sorted({r.case for r in records})
    assert keys == ["ds/Tr/a_one", "ds/Tr/a_one#2"]  # b_apart replaced by a_one, drawn again
    assert summarise(records, [1, 2], "bosam")["cases"] == 2


def test_bosam_protocol_with_a_model_on_its_crop(dataset):
    from engines.torch_engine import TorchEngine

    from bosam_cli.model import build_preset

    torch.manual_seed(0)
    engine = TorchEngine(build_preset("tiny"))
    result = evaluate([str(dataset)], EvaluateOptions(clicks=[1, 2], protocol="bosam", bosam_grid="model", cases=1),
                      engine=engine)
    recs = result["records"]
    assert len(recs) == 2 and recs[0].gt_voxels > 0 and recs[0].encoder_s > 0
    assert result["settings"]["bosam_grid"] == "model" and "per-case BEST" in result["settings"]["protocol_definition"]
    seg = CropSegmenter(engine, (-1000.0, 1000.0))
    with pytest.raises(ValueError, match="128"):
        seg.set_volume(Volume(np.zeros((64, 64, 64), np.int16), np.eye(4)))


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_evaluate_checkpoint_and_baseline(dataset, tmp_path):
    from bosam_cli.model import build_preset

    from bosam_cli.checkpoints import save_checkpoint

    torch.manual_seed(0)
    ck = save_checkpoint(build_preset("tiny"), tmp_path / "tiny.pth")
    res = _bosam("evaluate", "--data", str(dataset), "--checkpoint", str(ck), "--engine", "torch", "--clicks", "1,2",
                 "--cases", "1", "--labels", "29", "--threads", "1", "--max-windows", "2", "--out", str(tmp_path / "o"),
                 "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["summary"]["protocol"] == "clicks" and doc["summary"]["objects"] == 1
    assert Path(doc["paths"]["csv"]).exists() and Path(doc["paths"]["markdown"]).exists()
    res = _bosam("evaluate", "--data", str(dataset), "--baseline", "threshold", "--clicks", "1,3", "--protocol", "bosam")
    assert res.returncode == 0, res.stderr
    assert "BoSAM published protocol" in res.stdout and "per-case BEST" in res.stdout
    assert "merged every label > 0" in res.stderr  # no --labels: told what was merged
    res = _bosam("evaluate", "--data", str(dataset), "--baseline", "threshold", "--clicks", "1", "--cases", "1")
    assert res.returncode == 0, res.stderr
    assert "no --labels: every label of the label maps was evaluated" in " ".join(res.stderr.split())
    assert "Dice@1" in res.stdout  # a wide terminal gets the Markdown table
    # an 80-column terminal gets a row per label and click count, every figure whole
    res = _bosam("evaluate", "--data", str(dataset), "--baseline", "threshold", "--clicks", "1,5,10", "--cases", "1",
                 "--labels", "29", "--out", str(tmp_path / "narrow"), columns=80)
    assert res.returncode == 0, res.stderr
    rows = json.loads((tmp_path / "narrow" / "evaluation.json").read_text())["summary"]["overall"]
    assert max(len(line) for line in res.stdout.splitlines()) <= 80
    for n in ("1", "5", "10"):
        assert f"{rows[n]['dice']:.3f}" in res.stdout and f"{100 * rows[n]['other']:.1f} %" in res.stdout
    assert "Dice@1" not in res.stdout and "Seconds per click: first " in res.stdout


def test_cli_evaluate_bad_input_is_one_line(dataset, tmp_path):
    res = _bosam("evaluate", "--data", str(tmp_path / "missing"), "--baseline", "threshold")
    assert res.returncode == 2 and "missing: no such dataset folder" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = _bosam("evaluate", "--data", str(dataset), "--baseline", "threshold", "--clicks", "0,x")
    assert res.returncode == 2 and "--clicks" in res.stderr
    for flags, message in ((["--nsd-mm", "-1"], "--nsd-mm: the surface Dice tolerance must be a finite number of mm above 0"),
                           (["--nsd-mm", "inf"], "--nsd-mm: the surface Dice tolerance must be a finite number of mm above 0"),
                           (["--threshold-hu", "nan"], "--threshold-hu: must be a finite HU value"),
                           (["--radius-mm", "-5"], "--radius-mm: the growth limit must be a finite number of mm above 0"),
                           (["--protocol", "bosam", "--no-clamp"], "--no-clamp: the bosam protocol's native grid clamps"),
                           (["--cases", "0"], "--cases: must be 1 or more, got 0"),
                           (["--clicks", "1," + "9" * 22], "--clicks: at most 100 clicks per object"),
                           (["--clicks", "1,,5"], "--clicks: expected comma-separated click counts like 1,5,10, got '1,,5'"),
                           (["--protocol", "bosam", "--seed", "-1"], "--seed must be in 0 .. 2**32-1, got -1"),
                           (["--out", str(dataset / "dataset.json")], "dataset.json: is a file; --out is the folder")):
        res = _bosam("evaluate", "--data", str(dataset), "--baseline", "threshold", *flags)
        assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    root = make_dataset(tmp_path / "bad", 1)
    ct, lab, aff = paint_case(2)
    moved = aff.copy()
    moved[2, 3] += 9.0
    save_nifti(ct, aff, root / "imagesTr" / "moved_0000.nii.gz")
    save_nifti(lab, moved, root / "labelsTr" / "moved.nii.gz")
    res = _bosam("evaluate", "--data", str(root), "--baseline", "threshold")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1
    assert "moved.nii.gz" in lines[0] and "affine differs" in lines[0]
