"""bosam train: the click loop, LoRA, checkpoints, exact resume, DDP with two CPU processes, CLI.

Everything runs the ``tiny`` preset on small phantom datasets with one torch thread per process
(on a shared 2-core machine one thread is several times faster than two oversubscribed ones).
"""

from __future__ import annotations

import dataclasses

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bone_datasets import make_dataset, paint_case, save_nifti
from bosam_cli.checkpoints import load_model, read_checkpoint, save_checkpoint
from bosam_cli.errors import BosamError
from bosam_cli.train import ClickLoop, TrainConfig, Upsampler, build_loss, freeze_never_trained, param_groups, train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from bosam_cli.phantom import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("train") / "ds", [1, 2], shape=(40, 40, 32), spacing_mm=(3.0, 3.0, 3.0))


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=[str(data)], out_dir=str(out), preset="tiny", epochs=1, steps_per_epoch=2, clicks=2,
                min_fg_mm3=500.0, workers=0, threads=1, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def _bosam(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bosam_cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)


# ---------------------------------------------------------------------------------------------
# the pieces of a step


def test_matmul_upsampling_is_torch_trilinear():
    low = torch.randn(2, 1, 32, 32, 32)
    ref = torch.nn.functional.interpolate(low, size=(128,) * 3, mode="trilinear", align_corners=False)
    assert (Upsampler(32, 128)(low) - ref).abs().max() < 1e-5


@pytest.mark.parametrize("sim_on", ["host", "device"])
def test_training_clicks_see_the_prediction_as_logits_above_one_half(sim_on):
    """The published simulator thresholds the upsampled logits at 0.5 (FACTS.md section 5): a
    window predicted at logit 0.3 everywhere is an empty prediction, so the click is a
    positive one inside the bone, not a negative one in the background."""
    from bosam_cli.model import build_preset

    loop = ClickLoop(build_preset("tiny"), build_loss("dicece"), sim_on=sim_on)
    gt = np.zeros((1, 16, 16, 16), bool)
    gt[0, 4:9, 5:10, 6:11] = True
    targets = torch.from_numpy(gt[:, None].astype(np.float32))
    logits = torch.full((1, 1, 16, 16, 16), 0.3)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        prompts = loop._host_prompts(gt, rng, torch.device("cpu")) if sim_on == "host" else loop._device_prompts(targets, rng)
        points, labels = prompts(True, logits)
        i, j, k = (int(round(float(v))) for v in points[0, 0])
        assert int(labels[0, 0]) == 1 and gt[0, i, j, k], (seed, points, labels)


def test_click_loop_learns_a_fixed_window():
    """Loss summed over click iterations, BPTT through the mask prompt: a few AdamW steps on one
    window lower it (the loop, loss and optimiser groups are wired to the right parameters)."""
    torch.manual_seed(0)
    from bosam_cli.model import build_preset

    sam = build_preset("tiny").train()
    frozen = freeze_never_trained(sam)
    assert any("iou_prediction_head" in n for n in frozen)
    groups = param_groups(sam, 1e-3, 0.1)
    assert [(g["name"], g["lr"]) for g in groups] == [("image_encoder", 1e-3), ("prompt_encoder", 1e-4), ("mask_decoder", 1e-4)]
    opt = torch.optim.AdamW(groups)
    loop = ClickLoop(sam, build_loss("dicece"))
    gt = np.zeros((1, 128, 128, 128), bool)
    gt[0, 44:84, 50:78, 40:90] = True
    images = torch.from_numpy(np.where(gt, 2.0, -0.5).astype(np.float32))[:, None]
    targets = torch.from_numpy(gt[:, None].astype(np.float32))
    losses = []
    for step in range(4):
        loss, dice = loop(images, targets, gt, [True, True], np.random.default_rng(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    assert 0.0 <= float(dice.mean()) <= 1.0


def test_mixed_click_simulation_draws_interior_error_clicks(monkeypatch):
    """--click-sim mixed: about half of the clicks come from the interior-of-error generator, the
    rest uniform; uniform never calls it; an unknown simulator is refused."""
    import bosam_cli.train as train_mod
    from bosam_cli.model import build_preset

    calls = {"ritm": 0, "uniform": 0}
    real_ritm, real_uniform = train_mod.ritm_click, train_mod.uniform_error_click

    def ritm(*a, **k):
        calls["ritm"] += 1
        return real_ritm(*a, **k)

    def uniform(*a, **k):
        calls["uniform"] += 1
        return real_uniform(*a, **k)

    monkeypatch.setattr(train_mod, "ritm_click", ritm)
    monkeypatch.setattr(train_mod, "uniform_error_click", uniform)
    torch.manual_seed(0)
    sam = build_preset("tiny").eval()
    gt = np.zeros((1, 128, 128, 128), bool)
    gt[0, 44:84, 50:78, 40:90] = True
    images = torch.from_numpy(np.where(gt, 2.0, -0.5).astype(np.float32))[:, None]
    targets = torch.from_numpy(gt[:, None].astype(np.float32))
    with torch.no_grad():
        ClickLoop(sam, build_loss("dicece"))(images, targets, gt, [True] * 4, np.random.default_rng(0))
        assert calls == {"ritm": 0, "uniform": 4}
        ClickLoop(sam, build_loss("dicece"), click_sim="mixed")(images, targets, gt, [True] * 12, np.random.default_rng(0))
    assert calls["ritm"] >= 2 and calls["uniform"] - 4 >= 2 and calls["ritm"] + calls["uniform"] == 16, calls
    with pytest.raises(BosamError, match="--click-sim"):
        ClickLoop(sam, build_loss("dicece"), click_sim="edt")


def test_neighbour_weight_adds_the_mean_cross_entropy_on_other_labels():
    """--neighbour-weight w adds w * mean softplus(logit) over the other labels' voxels to each
    decoder call's loss (BCE towards background there); 0 leaves the published loss; a weight
    without the other labels, or a negative one, is refused."""
    from bosam_cli.model import build_preset

    torch.manual_seed(0)
    sam = build_preset("tiny").eval()
    gt = np.zeros((1, 128, 128, 128), bool)
    gt[0, 44:84, 50:78, 40:90] = True
    others = np.zeros_like(gt)
    others[0, 84:100, 50:78, 40:90] = True  # a neighbour right next to the object
    images = torch.from_numpy(np.where(gt | others, 2.0, -0.5).astype(np.float32))[:, None]
    targets = torch.from_numpy(gt[:, None].astype(np.float32))
    oth = torch.from_numpy(others[:, None].astype(np.float32))

    def zero_loss(logits, target):
        return logits.sum() * 0.0

    with torch.no_grad():
        plain, _ = ClickLoop(sam, zero_loss)(images, targets, gt, [False], np.random.default_rng(0), oth)
        loss, _ = ClickLoop(sam, zero_loss, neighbour_weight=2.5)(images, targets, gt, [False, False],
                                                                  np.random.default_rng(0), oth)
        emb = sam.image_encoder(images)
        prev = torch.zeros(1, 1, 32, 32, 32)
        expected = 0.0
        for _ in range(2):  # no points: the mask prompt alone, as in the published no-point steps
            low, _ = sam.decode(emb, None, None, prev)
            logits = torch.nn.functional.interpolate(low, size=(128,) * 3, mode="trilinear", align_corners=False)
            expected += 2.5 * float(torch.nn.functional.softplus(logits)[oth > 0].mean())
            prev = low
    assert float(plain) == 0.0
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(BosamError, match="neighbour"):
        ClickLoop(sam, zero_loss, neighbour_weight=1.0)(images, targets, gt, [False], np.random.default_rng(0))
    with pytest.raises(BosamError, match="--neighbour-weight"):
        ClickLoop(sam, zero_loss, neighbour_weight=-1.0)


def test_click_memory_all_feeds_every_click_so_far():
    """--click-memory all: each decoder call gets all of the window's clicks so far (newest last,
    shorter histories padded with -1), also on the point-free steps; newest (published) gets
    one point per click step and none on the point-free steps. Same clicks either way."""
    from bosam_cli.model import build_preset

    torch.manual_seed(0)
    sam = build_preset("tiny").eval()
    gt = np.zeros((2, 128, 128, 128), bool)
    gt[0, 44:84, 50:78, 40:90] = True
    gt[1, 30:60, 30:60, 30:60] = True
    images = torch.from_numpy(np.where(gt, 2.0, -0.5).astype(np.float32))[:, None]
    targets = torch.from_numpy(gt[:, None].astype(np.float32))
    seen: dict[str, list] = {}
    for memory in ("newest", "all"):
        calls = seen[memory] = []
        real = sam.decode

        def spy(emb, points, labels, prev, _real=real, _calls=calls):
            _calls.append(None if points is None else (points.cpu().numpy().copy(), labels.cpu().numpy().copy()))
            return _real(emb, points, labels, prev)

        sam.decode = spy
        try:
            with torch.no_grad():
                ClickLoop(sam, lambda lo, t: lo.sum() * 0.0, click_memory=memory)(
                    images, targets, gt, [True, True, False, True], np.random.default_rng(3))
        finally:
            del sam.decode
    newest, every = seen["newest"], seen["all"]
    assert newest[2] is None and all(c[0].shape == (2, 1, 3) for i, c in enumerate(newest) if i != 2)
    assert [c[0].shape[1] for c in every] == [1, 2, 2, 3]
    # the first two clicks follow the same predictions in both modes; later ones each run's own
    assert np.array_equal(every[1][0][:, :1], newest[0][0]) and np.array_equal(every[1][0][:, 1:], newest[1][0])
    assert np.array_equal(every[1][1], np.concatenate([newest[0][1], newest[1][1]], 1))
    for later in (2, 3):  # the history is kept, the newest click last
        assert np.array_equal(every[later][0][:, :2], every[1][0]) and np.array_equal(every[later][1][:, :2], every[1][1])
    for b in range(2):
        for j in range(3):  # every click is an error voxel: positive inside the object, negative outside
            ijk = tuple(int(v) for v in every[3][0][b, j])
            assert gt[b][ijk] == bool(every[3][1][b, j])
    with pytest.raises(BosamError, match="--click-memory"):
        ClickLoop(sam, lambda lo, t: lo.sum(), click_memory="some")


# ---------------------------------------------------------------------------------------------
# runs


def test_training_writes_loadable_checkpoints_with_metadata(phantoms, tmp_path):
    out = tmp_path / "run"
    result = train(_cfg(phantoms, out, epochs=2, val_data=[str(phantoms)], val_cases=1, val_clicks=1, tensorboard=True))
    assert result.epochs_done == 2 and result.global_step == 4 and not result.stopped_early
    for name in ("last.pth", "best.pth", "final.pth"):
        assert (out / name).exists(), name
    try:
        import tensorboard  # noqa: F401

        assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    except ImportError:
        assert not (out / "tensorboard").exists()
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("phase,epoch,step,loss,dice") and sum(r.startswith("train,") for r in rows) == 4
    assert sum(r.startswith("val,") for r in rows) == 2
    model = load_model(out / "final.pth")
    meta = model.checkpoint_metadata
    assert model.preset == "tiny" and meta["spacing_mm"] == 1.5 and meta["intensity"]["clamp_hu"] == [-1000.0, 1000.0]
    assert meta["label_ids"] and meta["training"]["global_step"] == 4 and meta["data"]["cases"] == 2
    assert meta["click_memory"] == "newest"  # the published loop unless asked otherwise
    assert meta["training"]["click_sim_on"] == "host"  # auto on CPU: clicks.py on the host
    # what a SAM-Med3D tool does with the file: plain torch.load and a 'model_state_dict'
    raw = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert set(raw["model_state_dict"]) == set(model.state_dict())
    assert {"optimizer", "scheduler", "rng", "train_state"} <= set(raw)
    assert raw["train_state"]["epoch"] == 2 and raw["train_state"]["global_step"] == 4
    # the scheduler is stepped per epoch: T_cur = 2 of T_0 = 5
    assert raw["scheduler"]["T_cur"] == 2 and raw["scheduler"]["T_0"] == 5


def test_resume_after_an_interruption_ends_with_the_same_weights(phantoms, tmp_path):
    kw = dict(epochs=2, steps_per_epoch=2, checkpoint_every=1)
    train(_cfg(phantoms, tmp_path / "whole", **kw))
    first = train(_cfg(phantoms, tmp_path / "cut", stop_after_steps=3, **kw))  # stops inside epoch 2
    assert first.stopped_early and first.global_step == 3 and not (tmp_path / "cut" / "final.pth").exists()
    # a killed checkpoint write left its temp file; fewer epochs than the run has reached is refused
    stale = tmp_path / "cut" / ".last.pth.abc123.tmp"
    stale.write_bytes(b"partial")
    with pytest.raises(BosamError, match="--epochs 1: .* is already in epoch 2"):
        train(_cfg(phantoms, tmp_path / "cut", resume=True, **{**kw, "epochs": 1}))
    assert not stale.exists()
    second = train(_cfg(phantoms, tmp_path / "cut", resume=True, **kw))
    assert second.global_step == 4 and not second.stopped_early
    a = read_checkpoint(tmp_path / "whole" / "last.pth", keep_container=True)
    b = read_checkpoint(tmp_path / "cut" / "last.pth", keep_container=True)
    for key, value in a.state_dict.items():
        assert torch.equal(value, b.state_dict[key]), key
    sa, sb = a.container["optimizer"]["state"], b.container["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    # the log of the resumed run reads like the uninterrupted one
    col = lambda p: [r.split(",")[:5] for r in (p / "log.csv").read_text().splitlines()]  # noqa: E731
    assert col(tmp_path / "whole") == col(tmp_path / "cut")


def test_tensorboard_of_a_resumed_run_drops_the_events_past_its_checkpoint(tmp_path, monkeypatch):
    """A killed run logged steps past its last checkpoint; the resumed run logs them again.
    The CSV keeps only rows up to the checkpoint's step, and TensorBoard is told to purge the
    events from the next step on."""
    import types

    from bosam_cli.train import RunLog

    made = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            made.append(purge_step)

        def add_scalar(self, *a, **k):
            pass

        def close(self):
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    first = RunLog(tmp_path, None, True)
    for step in (1, 2, 3):
        first.write(phase="train", epoch=0, step=step, loss=1.0)
    first.close()
    second = RunLog(tmp_path, 2, True)  # resumed from the checkpoint of step 2
    second.close()
    assert made == [None, 3]
    steps = [r.split(",")[2] for r in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2"]


def test_resume_warns_when_auto_settings_resolve_differently_on_another_device(phantoms, tmp_path):
    """A run started on the CPU (auto: clicks on the host, fp32) and resumed where auto means
    the GPU's choices (clicks on the device, fp16) is warned about, flag by flag; the same
    device, or the same explicit choices, give no warning."""
    from bosam_cli.train import LAST, _open_resume

    cfg = _cfg(phantoms, tmp_path / "run", epochs=1, steps_per_epoch=1, checkpoint_every=1)
    train(cfg)
    again = dataclasses.replace(cfg, resume=True)
    assert _open_resume(again, tmp_path / "run" / LAST, 1, "cpu")[2] == []
    warnings = _open_resume(again, tmp_path / "run" / LAST, 1, "cuda")[2]
    assert len(warnings) == 2
    assert "--click-sim-on auto resolves on cuda to clicks simulated on the device, not clicks simulated on the host" in warnings[0]
    assert "--precision auto resolves on cuda to precision fp16, not precision fp32" in warnings[1]
    pinned = dataclasses.replace(cfg, resume=True, click_sim_on="host", precision="fp32")
    warnings = _open_resume(pinned, tmp_path / "run" / LAST, 1, "cuda")[2]
    assert len(warnings) == 2 and all("changed from 'auto'" in w for w in warnings)

    # any flag that changes the windows is told; the optimiser's own settings are kept, and said
    # so; more epochs, other threads or validation settings change nothing and are not told
    changed = dataclasses.replace(cfg, resume=True, flip=False, lr=5e-3, epochs=2, threads=2, val_cases=1)
    warnings = _open_resume(changed, tmp_path / "run" / LAST, 1, "cpu")[2]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("--flip changed from True to False: the resumed run will not match")
    assert warnings[1].startswith("--lr changed from None to 0.005: ignored, a resumed run keeps the learning rates")
    # leaving out --preset (the model comes from last.pth) is not a change
    assert _open_resume(dataclasses.replace(again, preset=None), tmp_path / "run" / LAST, 1, "cpu")[2] == []
    # the architecture comes from last.pth: another --preset is ignored, said so, and not recorded
    other = dataclasses.replace(again, preset="sam-med3d")
    assert _open_resume(other, tmp_path / "run" / LAST, 1, "cpu")[2] == [
        "--preset changed from 'tiny' to 'sam-med3d': ignored, a resumed run goes on with the model in last.pth"]
    resumed = dataclasses.replace(changed, flip=True, preset="sam-med3d")
    train(resumed)
    meta = load_model(tmp_path / "run" / "final.pth").checkpoint_metadata
    assert meta["training"]["lr"] == 1e-4 and meta["training"]["global_step"] == 2  # the rate it really ran at
    assert meta["training"]["config"]["preset"] == "tiny" and meta["preset"] == "tiny"


def test_resume_warns_when_the_same_labels_select_other_ids_or_the_cases_changed(tmp_path):
    """--labels by name is resolved through dataset.json: edited between the runs, the same flag
    selects another bone, which no changed flag shows; cases added or removed change the run too.
    Both are warned about when resuming; an unchanged dataset gives no such warning."""
    from bone_datasets import FEMUR, L3, NAMES

    root = make_dataset(tmp_path / "ds", n_cases=3)
    out = tmp_path / "run"
    args = ["train", "--data", str(root), "--labels", "femur_left", "--preset", "tiny", "--no-tensorboard",
            "--steps-per-epoch", "1", "--threads", "1", "-o", str(out)]
    r = _bosam(*args, "--epochs", "1")
    assert r.returncode == 0, r.stderr
    r = _bosam(*args, "--epochs", "2", "--resume")
    assert r.returncode == 0 and "the resumed run will not match" not in r.stdout + r.stderr, r.stdout + r.stderr
    doc = json.loads((root / "dataset.json").read_text())
    doc["labels"] = {"background": 0, "femur_left": L3, NAMES[L3]: FEMUR}  # the names swapped
    (root / "dataset.json").write_text(json.dumps(doc))
    r = _bosam(*args, "--epochs", "3", "--resume")
    text = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 0, r.stderr
    assert (f"warning: the selected labels are now ids {L3}; the run trained on {FEMUR}: the resumed run will not "
            "match an uninterrupted one") in text, text

    from bosam_cli.data import scan_dataset
    from bosam_cli.train import _data_changed

    before = scan_dataset([root]).summary()
    assert _data_changed(before, scan_dataset([root]).summary()) == []
    doc["labels"] = {"background": 0, "femur_renamed": FEMUR, "l3_renamed": L3}  # same ids, new names: no change
    (root / "dataset.json").write_text(json.dumps(doc))
    assert _data_changed(before, scan_dataset([root]).summary()) == []
    next(iter(sorted((root / "labelsTr").iterdir()))).unlink()
    next(iter(sorted((root / "imagesTr").iterdir()))).unlink()
    (msg,) = _data_changed(before, scan_dataset([root]).summary())
    assert msg.startswith("the dataset changed since the run started (2 usable cases, 3 then")


def test_odd_torchrun_environments_are_one_line_errors_before_any_work(tmp_path):
    """A stale RANK=1 (a scheduler's environment) trained as a non-main process and wrote nothing,
    exit 0; WORLD_SIZE=0, 'abc', or 2 without RANK or MASTER_ADDR gave tracebacks (one left a
    log.csv behind)."""
    root = make_dataset(tmp_path / "ds")
    out = tmp_path / "run"
    args = ["train", "--data", str(root), "--preset", "tiny", "--epochs", "1", "--steps-per-epoch", "1",
            "--no-tensorboard", "--threads", "1", "-o", str(out)]
    clean = {k: "" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    cases = [
        ({"RANK": "1", "WORLD_SIZE": "1"}, "environment variable RANK=1: must be below WORLD_SIZE=1"),
        ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE='0': expected a whole number >= 1"),
        ({"WORLD_SIZE": "abc"}, "environment variable WORLD_SIZE='abc': expected a whole number >= 1"),
        ({"WORLD_SIZE": "2"}, "environment variable RANK: not set, but WORLD_SIZE=2 asks for a distributed run"),
        ({"WORLD_SIZE": "2", "RANK": "1"}, "environment variable MASTER_ADDR: not set, but WORLD_SIZE=2"),
    ]
    for env, message in cases:
        run_env = {k: v for k, v in {**os.environ, **env}.items() if k not in clean or k in env}
        r = subprocess.run([sys.executable, "-m", "bosam_cli", *args], capture_output=True, text=True, timeout=600,
                           env={**run_env, "COLUMNS": "300"})
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (env, r.stdout, r.stderr)
        assert r.stderr.startswith(f"error: {message}"), (env, r.stderr)
        assert not out.exists()


def test_resume_refusals(phantoms, tmp_path):
    with pytest.raises(BosamError, match="nothing to resume"):
        train(_cfg(phantoms, tmp_path / "none", resume=True))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pth").write_bytes(b"x")
    with pytest.raises(BosamError, match="pass --resume"):
        train(_cfg(phantoms, tmp_path / "run"))
    with pytest.raises(BosamError, match="--from CKPT .* or --preset"):
        train(_cfg(phantoms, tmp_path / "p", preset=None))
    with pytest.raises(BosamError, match="fp16 needs a CUDA"):
        train(_cfg(phantoms, tmp_path / "q", precision="fp16", device="cpu"))
    with pytest.raises(BosamError, match=r"--spacing must be a window spacing in \(0, 50\] mm, got 60.0"):
        train(_cfg(phantoms, tmp_path / "s", spacing_mm=60.0))  # its checkpoints were refused by segment and export
    with pytest.raises(BosamError, match=r"--lora-rank 100000: above the encoder's width \d+, the most"):
        train(_cfg(phantoms, tmp_path / "r", lora_rank=100000))  # it wrote a 5.5 GB last.pth
    assert not (tmp_path / "r" / "last.pth").exists()


# ---------------------------------------------------------------------------------------------
# LoRA


def test_lora_starts_at_the_base_model_and_merges_into_a_plain_checkpoint(phantoms, tmp_path):
    from bosam_cli.model import build_preset
    from bosam_cli.model.lora import apply_lora

    torch.manual_seed(1)
    base = build_preset("tiny").eval()
    base_ck = save_checkpoint(base, tmp_path / "base.pth")
    # step 0 = base: same output for the same input
    wrapped = load_model(base_ck)
    apply_lora(wrapped, 4)
    x = torch.randn(1, 1, 128, 128, 128)
    pts, labs, mask = torch.tensor([[[60.0, 64.0, 70.0]]]), torch.tensor([[1]]), torch.zeros(1, 1, 32, 32, 32)
    with torch.no_grad():
        ref = base.decode(base.image_encoder(x), pts, labs, mask)[0]
        got = wrapped.decode(wrapped.image_encoder(x), pts, labs, mask)[0]
    assert torch.equal(ref, got)

    out = tmp_path / "lora"
    train(_cfg(phantoms, out, init_from=str(base_ck), preset=None, lora_rank=4, merge_lora=True, lr=1e-3,
               steps_per_epoch=1, checkpoint_every=0))
    final = torch.load(out / "final.pth", map_location="cpu", weights_only=True)
    assert "lora" not in final and final["bosam"]["lora"]["rank"] == 4
    merged = load_model(out / "final.pth")
    assert merged.checkpoint_metadata["lora"]["adapters"] == "merged and dropped"
    before, after = base.state_dict(), merged.state_dict()
    assert set(before) == set(after)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.endswith("attn.qkv.weight") for k in changed)  # only q/v deltas moved
    # last.pth keeps the adapters and the base qkv for an exact resume
    last = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert any(k.endswith("linear_b_q.weight") for k in last["lora"])
    assert any(k.endswith("attn.qkv.qkv.weight") for k in last["lora"])


def test_full_fine_tune_of_a_lora_run_does_not_claim_lora(phantoms, tmp_path):
    lora = train(_cfg(phantoms, tmp_path / "lora", lora_rank=2, merge_lora=True, steps_per_epoch=1))
    assert load_model(lora.final).checkpoint_metadata["lora"]["rank"] == 2
    full = train(_cfg(phantoms, tmp_path / "full", init_from=str(lora.final), preset=None, steps_per_epoch=1))
    meta = load_model(full.final).checkpoint_metadata
    assert "lora" not in meta and meta["init"]["from"] == str(lora.final)


def test_lora_resume_is_exact(phantoms, tmp_path):
    kw = dict(epochs=1, steps_per_epoch=2, checkpoint_every=1, lora_rank=2, lr=1e-3)
    train(_cfg(phantoms, tmp_path / "whole", **kw))
    train(_cfg(phantoms, tmp_path / "cut", stop_after_steps=1, **kw))
    train(_cfg(phantoms, tmp_path / "cut", resume=True, **kw))
    a = torch.load(tmp_path / "whole" / "final.pth", weights_only=True)
    b = torch.load(tmp_path / "cut" / "final.pth", weights_only=True)
    for part in ("model_state_dict", "lora"):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), part


def test_a_click_memory_all_run_says_so_in_its_checkpoint(phantoms, tmp_path):
    from bosam_cli.segment import SegmentOptions, engine_metadata, make_session
    from engines.torch_engine import TorchEngine

    result = train(_cfg(phantoms, tmp_path / "all", clicks=3, click_memory="all"))
    assert result.global_step == 2
    model = load_model(tmp_path / "all" / "final.pth")
    assert model.checkpoint_metadata["click_memory"] == "all"
    assert model.checkpoint_metadata["training"]["config"]["click_memory"] == "all"
    eng = TorchEngine(model)
    assert make_session(eng, SegmentOptions(), engine_metadata(eng)).click_memory == "all"
    with pytest.raises(BosamError, match="--click-memory"):
        train(_cfg(phantoms, tmp_path / "bad", click_memory="every"))


def test_validation_feeds_clicks_the_way_the_run_trains(phantoms, monkeypatch):
    import bosam_cli.session as session_mod
    from bosam_cli.data import scan_dataset
    from bosam_cli.model import build_preset
    from bosam_cli.train import validate

    made = []
    real = session_mod.Session

    class Spy(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self.click_memory)

    monkeypatch.setattr(session_mod, "Session", Spy)
    scan = scan_dataset([str(phantoms)], None, None, ("Tr",), None)
    for memory in ("all", "newest"):
        dice = validate(build_preset("tiny").eval(), torch.device("cpu"), scan, _cfg(phantoms, phantoms, click_memory=memory,
                        val_clicks=1), 1.5, (-1000.0, 1000.0), 1)
        assert dice is not None and 0.0 <= dice <= 1.0
    assert made == ["all", "newest"]


# ---------------------------------------------------------------------------------------------
# DDP and the CLI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_with_two_cpu_processes_writes_one_checkpoint(phantoms, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "bosam_cli", "train", "--data", str(phantoms), "--out", str(out),
           "--preset", "tiny", "--epochs", "1", "--steps-per-epoch", "2", "--clicks", "2", "--min-fg-mm3", "500",
           "--workers", "0", "--no-tensorboard", "--json", "--device", "cpu"]  # CPU processes on GPU machines too
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout[res.stdout.index("{"):])  # only rank 0 prints
    assert summary["global_step"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["final.pth", "last.pth", "log.csv"]
    raw = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    assert raw["train_state"]["world_size"] == 2 and len(raw["rng"]) == 2
    assert raw["bosam"]["training"]["world_size"] == 2
    load_model(out / "final.pth")


def test_cli_train_refuses_a_dataset_with_mismatched_grids(tmp_path):
    root = make_dataset(tmp_path / "ds", 1)
    ct, lab, aff = paint_case(5)
    save_nifti(ct, aff, root / "imagesTr" / "odd_0000.nii.gz")
    save_nifti(lab[:, :-3], aff, root / "labelsTr" / "odd.nii.gz")
    res = _bosam("train", "--data", str(root), "--out", str(tmp_path / "run"), "--preset", "tiny", "--threads", "1")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "odd.nii.gz" in lines[0] and "shape" in lines[0] and "--skip-bad" in lines[0]
    assert not (tmp_path / "run" / "last.pth").exists()
    res = _bosam("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run"), "--preset", "tiny")
    assert res.returncode == 2 and "nope: no such dataset folder" in res.stderr
    # a bad --from fails before anything is written, and leaves no empty --out behind
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    res = _bosam("train", "--data", str(root), "--out", str(tmp_path / "fresh"), "--from", str(tmp_path / "bad.pth"),
                 "--skip-bad", "--threads", "1")
    assert res.returncode == 2 and "bad.pth" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "fresh").exists()
    for flags, message in ((["--threads", "-1"], "--threads must be >= 1"),
                           (["--steps-per-epoch", "-2"], "--steps-per-epoch must be >= 1"),
                           (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
                           (["--seed", str(2**32)], "--seed must be in 0 .. 2**32-1"),
                           (["--lr", "nan"], "--lr must be a finite number above 0"),
                           # NaN here trained NaN weights and exited 0; far too many threads killed torch
                           (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
                           (["--prompt-lr-scale", "nan"], "--prompt-lr-scale must be a finite number >= 0"),
                           (["--spacing-jitter", "-1"], "--spacing-jitter must be in 0 .. 0.5"),
                           (["--intensity-jitter", "nan"], "--intensity-jitter must be in 0 .. 1.0"),
                           (["--threads", "100000"], "--threads must be at most 1024")):
        res = _bosam("train", "--data", str(root), "--out", str(tmp_path / "x"), "--preset", "tiny", *flags)
        assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, (flags, res.stderr)
        assert not (tmp_path / "x").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_amp_step_with_grad_scaler(phantoms, tmp_path):
    result = train(_cfg(phantoms, tmp_path / "gpu", device="cuda", precision="fp16", steps_per_epoch=2))
    raw = torch.load(tmp_path / "gpu" / "last.pth", map_location="cpu", weights_only=True)
    assert result.global_step == 2 and raw["scaler"]["scale"] > 0
    assert raw["bosam"]["training"]["precision"] == "fp16"


def test_prompt_lr_scale_sets_the_prompt_encoder_and_decoder_groups():
    from bosam_cli.model import build_preset
    from bosam_cli.train import param_groups

    groups = {g["name"]: g["lr"] for g in param_groups(build_preset("tiny"), 1e-3, 0.1)}
    assert groups == {"image_encoder": 1e-3, "prompt_encoder": 1e-4, "mask_decoder": 1e-4}
    groups = {g["name"]: g["lr"] for g in param_groups(build_preset("tiny"), 1e-3, 0.1, prompt_lr_scale=1.0)}
    assert set(groups.values()) == {1e-3}
