"""Device-side training click simulation (bosam_cli/clicks_torch.py) and its use in the click
loop (``--click-sim-on device``), checked on CPU tensors against scipy and clicks.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from bosam_cli.clicks_torch import erosion_depth, interior_clicks, sim_clicks, uniform_clicks


def _blobs(seed: int, shape=(24, 20, 28), n=2) -> np.ndarray:
    """``n`` masks of a few smooth random blobs each."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((n, *shape)), sigma=(0, 2.5, 2.5, 2.5))
    masks = field > 0.05
    assert masks.reshape(n, -1).any(1).all()
    return masks


def _chessboard(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return ndimage.distance_transform_cdt(padded, metric="chessboard")[1:-1, 1:-1, 1:-1]


def test_erosion_depth_is_the_chessboard_distance_with_a_background_border():
    masks = _blobs(0)
    masks[1, :, :, :] = False
    masks[1, 3:17, 2:19, 0:25] = True  # a box touching the array's edge: the outside is background
    depth = erosion_depth(torch.from_numpy(masks)).numpy()
    for b in range(masks.shape[0]):
        np.testing.assert_array_equal(depth[b], _chessboard(masks[b]))
    assert depth[1].max() == 7  # box 14 x 17 x 25 cut by the edge at k = 0: depth min(7, 9, 13)
    assert erosion_depth(torch.zeros((1, 5, 5, 5), dtype=torch.bool)).sum() == 0


def test_uniform_clicks_fall_in_the_error_region_with_the_right_sign():
    gt = torch.from_numpy(_blobs(1, n=3))
    pred = torch.from_numpy(_blobs(2, n=3))
    pred[2] = gt[2]  # the third window has no error: a padding point
    gen = torch.Generator().manual_seed(0)
    seen_pos = seen_neg = 0
    for _ in range(30):
        pts, labs = uniform_clicks(pred, gt, gen)
        assert pts.shape == (3, 1, 3) and labs.shape == (3, 1) and labs.dtype == torch.int64
        assert labs[2, 0] == -1
        for b in range(2):
            assert labs[b, 0] in (0, 1)
            i, j, k = (int(v) for v in pts[b, 0])
            assert bool(pred[b, i, j, k]) != bool(gt[b, i, j, k])  # an error voxel
            assert labs[b, 0] == int(gt[b, i, j, k])  # positive iff a false negative
            seen_pos += int(labs[b, 0] == 1)
            seen_neg += int(labs[b, 0] == 0)
    assert seen_pos > 5 and seen_neg > 5  # both error kinds are drawn


def test_uniform_clicks_are_uniform_over_the_errors():
    gt = torch.zeros((1, 4, 4, 4), dtype=torch.bool)
    gt[0, 0, 0, :2] = True  # two false-negative voxels
    pred = torch.zeros_like(gt)
    pred[0, 3, 3, 3] = True  # one false positive
    gen = torch.Generator().manual_seed(1)
    counts = {}
    for _ in range(600):
        pts, _ = uniform_clicks(pred, gt, gen)
        key = tuple(int(v) for v in pts[0, 0])
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) == {(0, 0, 0), (0, 0, 1), (3, 3, 3)}
    assert all(150 < c < 250 for c in counts.values()), counts


def test_interior_clicks_follow_ritm_with_chessboard_depth():
    gt = torch.zeros((2, 30, 30, 30), dtype=torch.bool)
    pred = torch.zeros_like(gt)
    gt[0, 2:28, 2:28, 2:28] = True
    pred[0, 2:28, 2:28, 2:10] = True  # false negatives: 26 x 26 x 18 slab, depth 9
    pred[0, 0:30, 0:30, 28:30] = True  # false positives: a 2-voxel-thick sheet, depth 1
    gt[1, 5:9, 5:9, 5:9] = True  # window 1: FN depth 2 ...
    pred[1, 12:24, 12:24, 12:24] = True  # ... FP depth 6: a negative click deep in the leak
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        pts, labs = interior_clicks(pred, gt, gen)
        assert labs[:, 0].tolist() == [1, 0]
        fn0 = _chessboard((gt[0] & ~pred[0]).numpy())
        i, j, k = (int(v) for v in pts[0, 0])
        assert fn0[i, j, k] * 2 > fn0.max()  # deeper than half the region's maximum
        i, j, k = (int(v) for v in pts[1, 0])
        assert 15 <= i <= 20 and 15 <= j <= 20 and 15 <= k <= 20  # depth >= 4 of the 12^3 leak


def test_sim_clicks_mixes_per_window_and_pads_without_error():
    gt = torch.from_numpy(_blobs(4, n=2))
    pred = gt.clone()
    pred[0] = torch.from_numpy(_blobs(5, n=1)[0])
    pts, labs = sim_clicks(pred, gt, [True, False], torch.Generator().manual_seed(0))
    assert labs[1, 0] == -1 and labs[0, 0] in (0, 1)
    with pytest.raises(ValueError, match="interior has 1 entries for 2 windows"):
        sim_clicks(pred, gt, [True], None)


@pytest.mark.parametrize("memory", ["newest", "all"])
def test_click_loop_on_device_trains_and_is_deterministic(memory):
    from monai.losses import DiceCELoss

    from bosam_cli.model import build_preset
    from bosam_cli.train import ClickLoop

    torch.manual_seed(0)
    sam = build_preset("tiny").train()
    loop = ClickLoop(sam, DiceCELoss(sigmoid=True, squared_pred=True), click_sim="mixed", neighbour_weight=0.5,
                     click_memory=memory, sim_on="device")
    gt = np.zeros((2, 128, 128, 128), bool)
    gt[0, 40:80, 50:78, 30:90] = True
    gt[1, 20:50, 30:110, 40:70] = True
    images = torch.from_numpy(np.where(gt, 2.0, -0.5).astype(np.float32))[:, None]
    targets = torch.from_numpy(gt[:, None].astype(np.float32))
    others = torch.zeros_like(targets)
    others[:, :, 90:110] = 1.0
    calls = []
    orig = sam.decode

    def spy(emb, points, labels, prev):
        calls.append(None if points is None else (tuple(points.shape), labels.clone()))
        return orig(emb, points, labels, prev)

    sam.decode = spy
    schedule = [True, True, True, False, True, False]
    loss, dice = loop(images, targets, gt, schedule, np.random.default_rng(7), others)
    assert torch.isfinite(loss) and dice.shape == (2,)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in sam.parameters() if p.grad is not None)
    if memory == "newest":  # one point per call; none on mask-only calls
        assert [c if c is None else c[0] for c in calls] == [(2, 1, 3)] * 3 + [None, (2, 1, 3), None]
    else:  # the history grows by one point per clicked call and stays on mask-only calls
        assert [c[0] for c in calls] == [(2, 1, 3), (2, 2, 3), (2, 3, 3), (2, 3, 3), (2, 4, 3), (2, 4, 3)]
        assert (calls[-1][1][:, 0] == 1).all()  # the first click of a window is positive
    first = float(loss.detach())
    calls.clear()
    again, _ = loop(images, targets, gt, schedule, np.random.default_rng(7), others)
    assert float(again.detach()) == pytest.approx(first, rel=1e-6, abs=1e-6)


def test_a_device_simulated_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """--click-sim-on device seeds its generator from the step's NumPy generator, so a stopped and
    resumed run draws the same clicks (on CPU here; tests/test_cuda.py runs the CUDA default)."""
    from bosam_cli.phantom import write_phantom_dataset
    from bosam_cli.train import TrainConfig, train

    data = write_phantom_dataset(tmp_path / "ds", [1, 2], shape=(40, 40, 32), spacing_mm=(3.0, 3.0, 3.0))

    def cfg(out, **kw):
        return TrainConfig(data=[str(data)], out_dir=str(tmp_path / out), preset="tiny", epochs=2, steps_per_epoch=2,
                           clicks=3, click_sim="mixed", click_memory="all", click_sim_on="device", min_fg_mm3=500.0,
                           workers=0, threads=1, tensorboard=False, checkpoint_every=1, **kw)

    train(cfg("whole"))
    train(cfg("cut", stop_after_steps=3))
    train(cfg("cut", resume=True))
    whole = torch.load(tmp_path / "whole" / "final.pth", map_location="cpu", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "final.pth", map_location="cpu", weights_only=True)
    assert whole["bosam"]["training"]["click_sim_on"] == "device"
    for k, v in whole["model_state_dict"].items():
        assert torch.equal(v, cut["model_state_dict"][k]), k


def test_an_unknown_place_to_simulate_clicks_is_refused(tmp_path):
    from bosam_cli.errors import BosamError
    from bosam_cli.train import ClickLoop, TrainConfig, train

    with pytest.raises(BosamError, match="--click-sim-on must be one of auto, host, device, not 'gpu'"):
        train(TrainConfig(data=[str(tmp_path)], out_dir=str(tmp_path / "out"), click_sim_on="gpu"))
    with pytest.raises(BosamError, match="host or device"):
        ClickLoop(torch.nn.Linear(1, 1), lambda lo, t: lo.sum(), sim_on="auto")
