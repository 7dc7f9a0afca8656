"""Checkpoints of every published layout load strictly and safely; bad files fail clearly."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bosam_cli.checkpoints import (
    CheckpointError,
    detect_preset,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from bosam_cli.model import build_preset
from bosam_cli.model.lora import apply_lora, plain_state_dict
from conftest import REFERENCE, need


def manifest_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    ref = json.loads(need(REFERENCE / name).read_text())
    g = torch.Generator().manual_seed(seed)
    return {e["key"]: torch.randn(e["shape"], generator=g) * 0.02 for e in ref["keys"]}


@pytest.fixture(scope="module")
def sam_med3d_sd():
    return manifest_state_dict("sam_med3d_vit_b_ori.keys.json")


def _assert_loaded(model, sd):
    own = model.state_dict()
    assert set(own) == set(sd)
    for k in ("image_encoder.blocks.3.attn.rel_pos_h", "mask_decoder.iou_token.weight",
              "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"):
        assert torch.equal(own[k], sd[k])


def test_plain_state_dict_from_manifest_loads_strictly(tmp_path, sam_med3d_sd):
    p = tmp_path / "plain.pth"
    torch.save(sam_med3d_sd, p)
    ck = read_checkpoint(p)
    assert ck.layout == "state-dict"
    model = load_model(p)
    assert model.preset == "sam-med3d"
    _assert_loaded(model, sam_med3d_sd)


def test_training_checkpoint_with_namespace_and_module_prefix_loads(tmp_path, sam_med3d_sd):
    args = argparse.Namespace(device=torch.device("cpu"), lr=8e-4, task_name="ft", gpu_ids=[0, 1], work_dir=Path("/w"))
    p = tmp_path / "sam_model_latest.pth"
    torch.save(
        {
            "epoch": 199,
            "model_state_dict": {f"module.{k}": v for k, v in sam_med3d_sd.items()},
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "lr_scheduler_state_dict": {"last_epoch": 199},
            "losses": [np.float64(0.4), 0.3],
            "dices": [np.float32(0.7)],
            "best_loss": np.float64(0.3),
            "best_dice": 0.71,
            "args": args,
            "used_datas": ["ct_a", "ct_b"],
        },
        p,
    )
    ck = read_checkpoint(p)
    assert ck.layout == "training-checkpoint"
    assert "args" in ck.extra_keys and "stripped 'module.' prefix" in ck.notes
    _assert_loaded(load_model(p), sam_med3d_sd)


def test_unused_vit_b_256_manifest_loads_strictly(tmp_path):
    sd = manifest_state_dict("bosam_vit_b_e384_img256_unused.keys.json")
    p = tmp_path / "vitb.pth"
    torch.save({"model_state_dict": sd}, p)
    model = load_model(p)
    assert model.preset == "vit-b-256" and model.img_size == 256
    _assert_loaded(model, sd)


def test_bosam_lora_layout_is_merged_into_qkv(tmp_path):
    sd = manifest_state_dict("bosam_lora_r4_vit_b_ori.keys.json")
    # linear_* and w_As/w_Bs are the same modules in BoSAM: make them equal
    for i in range(12):
        pre = f"sam.image_encoder.blocks.{i}.attn.qkv"
        sd[f"{pre}.linear_a_q.weight"] = sd[f"w_As.{2 * i}.weight"]
        sd[f"{pre}.linear_b_q.weight"] = sd[f"w_Bs.{2 * i}.weight"]
        sd[f"{pre}.linear_a_v.weight"] = sd[f"w_As.{2 * i + 1}.weight"]
        sd[f"{pre}.linear_b_v.weight"] = sd[f"w_Bs.{2 * i + 1}.weight"]
    p = tmp_path / "lora.pth"
    torch.save({"model_state_dict": sd, "args": argparse.Namespace(lora=True)}, p)
    ck = read_checkpoint(p)
    assert ck.layout == "bosam-lora" and len(ck.state_dict) == 324
    model = load_model(p)
    for i in (0, 7, 11):
        w = model.state_dict()[f"image_encoder.blocks.{i}.attn.qkv.weight"]
        base = sd[f"sam.image_encoder.blocks.{i}.attn.qkv.qkv.weight"]
        dq = sd[f"w_Bs.{2 * i}.weight"] @ sd[f"w_As.{2 * i}.weight"]
        dv = sd[f"w_Bs.{2 * i + 1}.weight"] @ sd[f"w_As.{2 * i + 1}.weight"]
        assert torch.allclose(w[:768], base[:768] + dq, atol=1e-6)
        assert torch.equal(w[768:1536], base[768:1536])
        assert torch.allclose(w[1536:], base[1536:] + dv, atol=1e-6)


def test_lora_merge_equals_applying_deltas_at_run_time(tmp_path):
    torch.manual_seed(0)
    model = build_preset("tiny").eval()
    apply_lora(model, rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "linear_" in name:
                p.normal_(0, 0.05)
    # write it in BoSAM's LoRA_Sam3D layout
    bosam = {}
    for k, v in model.state_dict().items():
        bosam[f"sam.{k}"] = v
        if ".attn.qkv.linear_" in k:
            i = int(k.split("blocks.")[1].split(".")[0])
            ab, branch = k.split("linear_")[1].split(".")[0].split("_")
            idx = 2 * i + (0 if branch == "q" else 1)
            bosam[f"w_{ab.upper()}s.{idx}.weight"] = v
    p = tmp_path / "bosam_lora.pth"
    torch.save({"model_state_dict": bosam}, p)
    merged = load_model(p)
    x = torch.randn(1, 1, 128, 128, 128)
    with torch.inference_mode():
        runtime = model.image_encoder(x)
        plain = merged.image_encoder(x)
    assert torch.allclose(runtime, plain, atol=1e-4, rtol=1e-4)
    assert (runtime - model.image_encoder.neck(torch.zeros(1, 192, 8, 8, 8))).abs().max() > 0  # sanity
    # our own save writes the merged plain layout
    save_checkpoint(model, tmp_path / "ours.pth")
    ours = load_model(tmp_path / "ours.pth")
    for k, v in plain_state_dict(model).items():
        assert torch.allclose(ours.state_dict()[k], v)


def test_training_checkpoint_saved_on_windows_loads(tmp_path):
    """A training checkpoint whose args hold a path pickled on Windows (pathlib.WindowsPath,
    which cannot be instantiated here) loads, its weights intact."""
    import pathlib

    class WinPath:  # pickles as pathlib.WindowsPath('C:/runs/ft') does on Windows
        def __reduce__(self):
            return (pathlib.WindowsPath, ("C:\\", "runs", "ft"))

    sd = build_preset("tiny").state_dict()
    p = tmp_path / "win.pth"
    torch.save({"model_state_dict": sd, "args": argparse.Namespace(work_dir=WinPath(), lr=1e-4)}, p)
    ck = read_checkpoint(p, keep_container=True)
    assert str(ck.container["args"].work_dir) == "C:\\runs\\ft"
    assert all(torch.equal(ck.state_dict[k], sd[k]) for k in sd)


def test_malformed_lora_and_metadata_are_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    lora = build_preset("tiny")
    apply_lora(lora, 2)
    bad = dict(lora.state_dict())
    key = next(k for k in bad if k.endswith("linear_b_q.weight"))
    bad[key] = torch.zeros(bad[key].shape[0], 3)  # rank 3 against A's rank 2
    torch.save(bad, tmp_path / "ranks.pth")
    with pytest.raises(CheckpointError, match=r"ranks\.pth: LoRA tensors do not fit together"):
        read_checkpoint(tmp_path / "ranks.pth")
    no_base = {k: v for k, v in lora.state_dict().items() if not k.endswith("attn.qkv.qkv.weight")}
    torch.save(no_base, tmp_path / "nobase.pth")
    with pytest.raises(CheckpointError, match=r"nobase\.pth: LoRA layout without its base weight"):
        read_checkpoint(tmp_path / "nobase.pth")
    save_file(build_preset("tiny").state_dict(), str(tmp_path / "meta.safetensors"), metadata={"bosam": "[1, 2]"})
    with pytest.raises(CheckpointError, match="metadata 'bosam' is a JSON list, not an object"):
        read_checkpoint(tmp_path / "meta.safetensors")
    # BoSAM's wrapper saved without its w_As/w_Bs lists: the A/B tensors inside the qkv modules merge
    torch.manual_seed(1)
    for name, prm in lora.named_parameters():
        if "linear_b" in name:
            prm.data.normal_()
    torch.save({"model_state_dict": {"sam." + k: v for k, v in lora.state_dict().items()}}, tmp_path / "sam.pth")
    merged = read_checkpoint(tmp_path / "sam.pth").state_dict
    assert all(torch.equal(merged[k], v) for k, v in plain_state_dict(lora).items())


def test_old_pickle_warning_stays_off_the_error_line(tmp_path):
    p = tmp_path / "raw.pth"
    p.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    r = subprocess.run([sys.executable, "-m", "bosam_cli", "info", "-c", str(p)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_compiled_model_prefix_is_stripped_and_adapter_only_files_are_explained(tmp_path):
    sd = build_preset("tiny").state_dict()
    torch.save({"model_state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}}, tmp_path / "compiled.pth")
    ck = read_checkpoint(tmp_path / "compiled.pth")
    assert set(ck.state_dict) == set(sd) and "stripped '_orig_mod.' prefix" in ck.notes
    adapters = {f"w_{ab}s.{i}.weight": torch.zeros(2, 2) for ab in "AB" for i in range(4)}
    torch.save(adapters, tmp_path / "adapters.pth")
    with pytest.raises(CheckpointError, match=r"adapters\.pth: holds only LoRA adapters \(8 w_As/w_Bs tensors\)"):
        read_checkpoint(tmp_path / "adapters.pth")


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = tmp_path / "evil.pth"
    torch.save({"model_state_dict": build_preset("tiny").state_dict(), "payload": Evil()}, p)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused: .*system"):
        read_checkpoint(p)
    assert not marker.exists()
    # a legacy (non-zip) pickle with the same payload
    p2 = tmp_path / "evil_legacy.pth"
    torch.save({"x": Evil()}, p2, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(p2)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"", "empty"),
        (b"hello, this is text", "not a PyTorch or safetensors checkpoint"),
        (pickle.dumps({"a": 1}, protocol=4), "not a PyTorch"),
    ],
)
def test_not_a_checkpoint_is_a_clear_error(tmp_path, content, pattern):
    p = tmp_path / "bad.pth"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=pattern) as err:
        load_model(p)
    assert str(p) in str(err.value)


def test_a_device_or_pipe_as_checkpoint_is_refused_without_reading_it(tmp_path):
    """'info -c /dev/zero' hashed the endless device until killed: one line now (run in a
    subprocess with a time limit, so the old behaviour fails the test instead of hanging it)."""
    fifo = tmp_path / "pipe.pth"
    os.mkfifo(fifo)
    for path in (Path("/dev/zero"), fifo):
        r = subprocess.run([sys.executable, "-m", "bosam_cli", "info", "-c", str(path)], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            f"error: {path}: not a regular file (a device or a pipe), not a checkpoint file"], r.stderr


def test_a_checkpoint_with_an_empty_state_dict_says_so(tmp_path):
    p = tmp_path / "empty_sd.pth"
    torch.save({"state_dict": {}, "epoch": 3}, p)
    with pytest.raises(CheckpointError, match=r"empty_sd\.pth: 'state_dict' is empty: the file holds no weights"):
        load_model(p)


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "t.pth"
    torch.save(build_preset("tiny").state_dict(), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(p)


def test_wrong_shapes_and_keys_list_the_mismatch(tmp_path):
    sd = build_preset("tiny").state_dict()
    sd["image_encoder.pos_embed"] = torch.zeros(1, 8, 8, 8, 100)
    del sd["mask_decoder.iou_token.weight"]
    sd["extra.weight"] = torch.zeros(3)
    p = tmp_path / "w.pth"
    torch.save(sd, p)
    with pytest.raises(CheckpointError) as err:
        load_model(p, preset="tiny")
    msg = str(err.value)
    assert "1 missing (mask_decoder.iou_token.weight)" in msg
    assert "1 unexpected (extra.weight)" in msg
    assert "image_encoder.pos_embed: file [1, 8, 8, 8, 100] vs model [1, 8, 8, 8, 192]" in msg
    with pytest.raises(CheckpointError, match="fit no known model; closest is preset 'tiny'"):
        load_model(p)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "missing.pth")


def test_safetensors_round_trip_with_metadata(tmp_path):
    model = build_preset("tiny")
    p = save_checkpoint(model, tmp_path / "m.safetensors", metadata={"spacing_mm": 1.5, "intensity": {"clamp_hu": [-1000, 1000]}})
    ck = read_checkpoint(p)
    assert ck.layout == "safetensors"
    assert ck.metadata["preset"] == "tiny" and ck.metadata["spacing_mm"] == 1.5
    again = load_model(p)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)
    assert again.checkpoint_metadata["intensity"]["clamp_hu"] == [-1000, 1000]


def test_save_is_atomic_and_metadata_must_be_plain(tmp_path):
    model = build_preset("tiny")
    target = tmp_path / "ours.pth"
    with pytest.raises(TypeError, match="plain types"):
        save_checkpoint(model, target, metadata={"when": object()})
    assert not target.exists() and not list(tmp_path.iterdir())
    save_checkpoint(model, target, metadata={"note": "x"})
    obj = torch.load(target, weights_only=True)  # readable by any tool, no allow-list needed
    assert set(obj) == {"model_state_dict", "bosam"} and obj["bosam"]["note"] == "x"
    assert detect_preset(obj["model_state_dict"]) == "tiny"


def test_info_describes_a_checkpoint(tmp_path):
    p = save_checkpoint(build_preset("tiny"), tmp_path / "t.pth")
    out = subprocess.run(
        [sys.executable, "-m", "bosam_cli", "info", "--checkpoint", str(p), "--json"],
        capture_output=True, text=True, check=True,
    )
    rep = json.loads(out.stdout)
    ck = rep["checkpoint"]
    assert ck["preset"] == "tiny" and ck["layout"] == "bosam" and len(ck["sha256"]) == 64
    assert ck["parameters"] == sum(p.numel() for p in build_preset("tiny").parameters())
    assert "torch" in rep["versions"]
    bad = subprocess.run(
        [sys.executable, "-m", "bosam_cli", "info", "--checkpoint", str(tmp_path / "nope.pth")],
        capture_output=True, text=True,
    )
    assert bad.returncode != 0 and "nope.pth" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
