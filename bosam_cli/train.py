"""``bosam train``: fine-tune (or train from scratch) a SAM-Med3D-architecture model on bone CT.

The recipe follows the published one (``reference/FACTS.md`` section 5):

* one image embedding per batch, then ``clicks`` decoder calls; each call gets one new point,
  simulated uniformly in the current error region (prediction: upsampled logits > 0.5, as
  published; so the first click is a random object voxel), plus the previous low-res logits as
  mask prompt; two calls get the mask prompt only (``clicks.training_schedule``); gradients flow back through the iterations (BPTT) unless
  ``detach_mask``;
* loss = MONAI DiceCE (sigmoid, squared_pred) or Generalized Dice + Focal on the logits
  upsampled to 128^3 against the binary object, summed over the iterations;
* AdamW, weight decay 0.1, encoder at ``lr`` and prompt encoder / mask decoder at ``lr * 0.1``;
  with LoRA only the adapters train (one group at ``lr``); CosineAnnealingWarmRestarts(T_0=5,
  T_mult=2) stepped per epoch; gradient accumulation; fp16 autocast + GradScaler on CUDA;
* DDP through ``torchrun`` (NCCL on GPUs, gloo on CPU); per-rank seeds; only rank 0 writes;
* clicks are simulated on the host (``clicks.py``) or, by default on CUDA, batched on the device
  (``clicks_torch.py``), so the prediction never leaves the GPU.

Differences from the published code, on purpose: windows come from ``windows.py`` (the same
world-space 1.5 mm RAS windows ``bosam segment`` uses) and are z-scored per window as in
inference; parameters the published recipe never trains (IoU head, hypernetworks 1-3,
``no_mask_embed``) are frozen instead of decayed; an optimiser step happens every
``accumulation`` micro-batches (the original's first step came after accum + 1).

Checkpoints (``last.pth`` every epoch and every ``checkpoint_every`` steps, ``best.pth`` by
validation Dice, ``final.pth`` at the end) keep the SAM-Med3D layout via ``save_checkpoint``;
``last.pth`` also holds optimiser, scheduler, scaler, RNG states, step counters and the LoRA
tensors, so ``--resume`` continues bit-exactly: every batch and click is drawn from a generator
seeded by (seed, rank, epoch, step, micro-batch), never from a stream that a restart would
reset.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .clicks import ritm_click, training_schedule, uniform_error_click
from .data import (
    PUBLISHED_MIN_FG_MM3,
    CaseStore,
    Patch,
    PatchConfig,
    PatchSampler,
    patch_rng,
    refuse_errors,
    refuse_output_in_dataset,
    scan_dataset,
)
from .errors import BosamError
from .runtime_info import MAX_THREADS
from .session import CLICK_MEMORIES
from .windows import DEFAULT_CLAMP_HU, DEFAULT_SPACING_MM

LOSSES = ("dicece", "gdfocal")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
CLICK_SIMS = ("uniform", "mixed")
CLICK_SIM_ON = ("auto", "host", "device")
LAST, BEST, FINAL = "last.pth", "best.pth", "final.pth"
LOG_FIELDS = ["phase", "epoch", "step", "loss", "dice", "lr", "samples_per_s", "elapsed_s"]
#: modules the published recipe never trains (multimask off, mask prompt always given)
NEVER_TRAINED = ("mask_decoder.iou_prediction_head.", "prompt_encoder.no_mask_embed.",
                 "mask_decoder.output_hypernetworks_mlps.1.", "mask_decoder.output_hypernetworks_mlps.2.",
                 "mask_decoder.output_hypernetworks_mlps.3.")


@dataclass
class TrainConfig:
    """Options of ``bosam train`` (the CLI flags, one to one).

    Attributes:
        data: dataset roots (nnU-Net style) to train on.
        out_dir: where checkpoints and logs go.
        val_data: dataset roots validated at the end of every epoch (clicks protocol).
        init_from: checkpoint to fine-tune (any layout ``load_model`` reads).
        preset: architecture when training from scratch (or to force one for ``init_from``).
        labels / labelmap: label filter (ids, names, ``bone`` with a label map).
        lora_rank: LoRA rank on q and v of every encoder block (0: full fine-tuning).
        merge_lora: ``final.pth`` without the adapter tensors (plain weights only).
        loss: "dicece" or "gdfocal".
        lr: encoder learning rate (None: 1e-4, or 5e-4 with LoRA, as published).
        prompt_lr_scale: learning rate of the prompt encoder and mask decoder over ``lr``
            (0.1 as published for fine-tuning; 1.0 suits training from scratch).
        epochs / steps_per_epoch: optimiser steps per epoch (None: cases / global batch).
        batch_size: windows per micro-batch and process; accumulation: micro-batches per step.
        clicks: decoder calls per window; detach_mask: cut BPTT through the mask prompt.
        click_sim: ``uniform`` (the published simulator: uniform over the error region) or
            ``mixed`` (each click drawn with probability 1/2 from ``clicks.ritm_click``, the
            interior of the larger error region, as users and the evaluate protocol click, else
            uniform; teaches the decoder to act on corrective clicks).
        neighbour_weight: weight of an extra loss term on the voxels of every other label in
            the window (neighbouring bones, organs): the mean binary cross-entropy towards
            "not this object" there, added to each decoder call's loss. 0 (default) is the
            published loss; a positive weight penalises leaking into labelled neighbours.
        click_memory: what each decoder call is given besides the previous mask: ``newest``
            (the published recipe: only the click just made) or ``all`` (every click of the
            window so far, as interactive tools keep them). Stored in the checkpoint, so that
            ``segment`` and ``evaluate`` feed clicks the way the model was trained.
        click_sim_on: where clicks are simulated: ``host`` (``clicks.py``, NumPy, exact
            distance transform), ``device`` (``clicks_torch.py``, batched on the training
            device, chessboard depth for interior clicks, no host round trip per decoder call)
            or ``auto`` (device on CUDA, host on CPU).
        precision: auto (fp16 autocast on CUDA, fp32 on CPU), fp32, fp16, bf16.
        spacing_mm / clamp_hu / no_clamp: window preprocessing (None: the checkpoint's, else
            1.5 mm and [-1000, 1000]).
        resume: continue from ``out_dir/last.pth``.
        checkpoint_every: also write ``last.pth`` every N optimiser steps (0: epochs only).
        stop_after_steps: stop once this many optimiser steps are done (a planned interruption,
            for tests and time-boxed jobs; resume continues).
    """

    data: list[str]
    out_dir: str
    val_data: list[str] = field(default_factory=list)
    init_from: str | None = None
    preset: str | None = None
    labels: str | None = None
    labelmap: str | None = None
    lora_rank: int = 0
    merge_lora: bool = False
    loss: str = "dicece"
    lr: float | None = None
    prompt_lr_scale: float = 0.1
    weight_decay: float = 0.1
    epochs: int = 10
    steps_per_epoch: int | None = None
    batch_size: int = 1
    accumulation: int = 1
    clicks: int = 10
    click_sim: str = "uniform"
    neighbour_weight: float = 0.0
    click_memory: str = "newest"
    click_sim_on: str = "auto"
    detach_mask: bool = False
    precision: str = "auto"
    device: str | None = None
    seed: int = 2023
    spacing_mm: float | None = None
    clamp_hu: tuple[float, float] | None = None
    no_clamp: bool = False
    max_shift_vox: int = 32
    min_fg_mm3: float = PUBLISHED_MIN_FG_MM3
    spacing_jitter: float = 0.1
    intensity_jitter: float = 0.1
    flip: bool = True
    val_cases: int = 4
    val_clicks: int = 3
    val_labels_per_case: int = 3
    resume: bool = False
    checkpoint_every: int = 0
    stop_after_steps: int | None = None
    cache: str | None = None
    skip_bad: bool = False
    workers: int = 1
    threads: int | None = None
    safetensors: bool = False
    tensorboard: bool = True
    upsample: str = "matmul"

    def plain(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["clamp_hu"] = list(self.clamp_hu) if self.clamp_hu is not None else None
        return d


# ---------------------------------------------------------------------------------------------
# the click loop (the part of a training step that the model sees)


def upsample_matrix(m: int, n: int) -> torch.Tensor:
    """(n, m) matrix of 1-D linear upsampling m -> n with align_corners=False (torch's
    ``interpolate`` rule: source = (x + 0.5) * m / n - 0.5, clamped at 0, right neighbour
    clamped at m - 1)."""
    x = (torch.arange(n, dtype=torch.float64) + 0.5) * (m / n) - 0.5
    x = x.clamp(min=0)
    i0 = x.floor().long().clamp(max=m - 1)
    i1 = (i0 + 1).clamp(max=m - 1)
    w = x - i0
    a = torch.zeros(n, m, dtype=torch.float64)
    a[torch.arange(n), i0] += 1 - w
    a[torch.arange(n), i1] += w
    return a.float()


class Upsampler(nn.Module):
    """Low-res logits (B, 1, m^3) -> (B, 1, n^3), trilinear, align_corners=False.

    ``mode="matmul"`` applies the separable interpolation as three small matrix products, which
    is the same function as ``F.interpolate`` (to float rounding) but whose backward pass is a
    matrix product too (F.interpolate's 3-D backward is the slowest op of a CPU training step).
    ``mode="interpolate"`` calls F.interpolate (the reference code's structure).
    """

    def __init__(self, m: int, n: int, mode: str = "matmul") -> None:
        super().__init__()
        if mode not in ("matmul", "interpolate"):
            raise ValueError(f"upsample mode must be 'matmul' or 'interpolate', not {mode!r}")
        self.m, self.n, self.mode = m, n, mode
        self.register_buffer("a", upsample_matrix(m, n), persistent=False)

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        if self.mode == "interpolate":
            return F.interpolate(low, size=(self.n,) * 3, mode="trilinear", align_corners=False)
        b = low.shape[0]
        a = self.a.to(low.dtype)
        x = low.reshape(b, self.m, self.m, self.m)
        x = torch.matmul(x, a.t())  # (b, i, j, z): along the last axis
        x = torch.einsum("bijz,yj->biyz", x, a)  # middle axis
        x = torch.einsum("biyz,xi->bxyz", x, a)  # first axis
        return x.reshape(b, 1, self.n, self.n, self.n)


def build_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """MONAI DiceCE (sigmoid, squared_pred; the SAM-Med3D loss) or GeneralizedDiceFocal (sigmoid;
    BoSAM's). Both take logits and a binary target of the same shape."""
    if name == "dicece":
        from monai.losses import DiceCELoss

        return DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")
    if name == "gdfocal":
        from monai.losses import GeneralizedDiceFocalLoss

        return GeneralizedDiceFocalLoss(sigmoid=True, reduction="mean")
    raise BosamError(f"--loss must be one of {', '.join(LOSSES)}, not {name!r}")


#: the published simulator's prediction: upsampled logits above 0.5, not 0 (FACTS.md section 5);
#: a voxel with a logit in (0, 0.5] still counts as missed, and can draw a positive click
CLICK_SIM_LOGIT = 0.5


class ClickLoop(nn.Module):
    """One training forward pass: encoder once, ``n`` decoder calls with simulated clicks, loss
    summed over the calls. A module so that DDP sees the whole step as one forward.

    Args:
        sam: the model (``Sam3D``).
        loss_fn: loss on (logits, target), both (B, 1, S, S, S).
        detach_mask: feed the previous logits detached (no BPTT through the mask prompt).
        upsample: "matmul" (fast, same function) or "interpolate".
        autocast_dtype: fp16/bf16 autocast for the model calls, None for fp32.
        click_sim: "uniform" or "mixed" (see ``TrainConfig``).
        neighbour_weight: weight of the leak penalty on other labels' voxels (see ``TrainConfig``).
        click_memory: "newest" (one point per call, the published loop) or "all" (every click of
            the window so far, padded with -1 labels to the longest history in the batch).
        sim_on: "host" (``clicks.py`` on NumPy copies of the prediction, exact distance
            transform) or "device" (``clicks_torch.py`` on the prediction where it is, batched,
            chessboard depth for the interior clicks; no host round trip per decoder call).
    """

    def __init__(self, sam: nn.Module, loss_fn: Callable, detach_mask: bool = False, upsample: str = "matmul",
                 autocast_dtype: torch.dtype | None = None, click_sim: str = "uniform",
                 neighbour_weight: float = 0.0, click_memory: str = "newest", sim_on: str = "host") -> None:
        super().__init__()
        if sim_on not in ("host", "device"):
            raise BosamError(f"click simulation runs on host or device, not {sim_on!r}")
        self.sim_on = sim_on
        if click_memory not in CLICK_MEMORIES:
            raise BosamError(f"--click-memory must be one of {', '.join(CLICK_MEMORIES)}, not {click_memory!r}")
        self.click_memory = click_memory
        if click_sim not in CLICK_SIMS:
            raise BosamError(f"--click-sim must be one of {', '.join(CLICK_SIMS)}, not {click_sim!r}")
        if not neighbour_weight >= 0:
            raise BosamError(f"--neighbour-weight must be >= 0, not {neighbour_weight}")
        self.click_sim = click_sim
        self.neighbour_weight = float(neighbour_weight)
        self.sam = sam
        self.loss_fn = loss_fn
        self.detach_mask = detach_mask
        self.upsampler = Upsampler(sam.mask_size, sam.img_size, upsample)
        self.autocast_dtype = autocast_dtype

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def forward(self, images: torch.Tensor, targets: torch.Tensor, gt: np.ndarray, schedule: Sequence[bool],
                rng: np.random.Generator, others: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss summed over the decoder calls, per-window Dice of the last call).

        Args:
            images: (B, 1, S, S, S) z-scored windows; targets: (B, 1, S, S, S) float 0/1.
            gt: (B, S, S, S) bool, the targets on the host (for click simulation).
            schedule: per decoder call, whether it gets a new point.
            rng: click generator.
            others: (B, 1, S, S, S) float 0/1, other labels' voxels (for ``neighbour_weight``).
        """
        if self.neighbour_weight and others is None:
            raise BosamError("a neighbour weight needs the other labels' voxels of each window")
        n_others = others.flatten(1).sum(1).clamp(min=1) if others is not None else None
        device = images.device
        b, m = images.shape[0], self.sam.mask_size
        with self._autocast(device):
            emb = self.sam.image_encoder(images)
        prev = torch.zeros(b, 1, m, m, m, device=device, dtype=emb.dtype)
        prompts = self._device_prompts(targets, rng) if self.sim_on == "device" else self._host_prompts(gt, rng, device)
        loss = images.new_zeros(())
        logits = None
        for has_point in schedule:
            points, labels = prompts(has_point, logits)
            with self._autocast(device):
                low, _ = self.sam.decode(emb, points, labels, prev.detach() if self.detach_mask else prev)
            logits = self.upsampler(low.float())
            loss = loss + self.loss_fn(logits, targets)
            if self.neighbour_weight:
                # BCE towards 0 on the neighbours' voxels: softplus(logit), mean per window
                leak = (F.softplus(logits) * others).flatten(1).sum(1) / n_others
                loss = loss + self.neighbour_weight * leak.mean()
            prev = low
        assert logits is not None
        return loss, _last_dice(logits, targets)

    def _host_prompts(self, gt: np.ndarray, rng: np.random.Generator, device: torch.device) -> Callable:
        """``prompts(has_point, logits) -> (points, labels)`` for one window batch, simulated with
        ``clicks.py`` on a host copy of the prediction (``logits`` None before the first call).
        A window with nothing left to correct gets a padding point (label -1)."""
        b = gt.shape[0]
        history: list[list[tuple[tuple[int, int, int], int]]] = [[] for _ in range(b)]

        def prompts(has_point: bool, logits: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            if has_point:
                pred = np.zeros(gt.shape, bool) if logits is None else (logits.detach() > CLICK_SIM_LOGIT).squeeze(1).cpu().numpy()
                pts = np.zeros((b, 1, 3), np.float32)
                labs = np.zeros((b, 1), np.int64)
                for i in range(b):
                    if self.click_sim == "mixed" and rng.random() < 0.5:
                        click = ritm_click(pred[i], gt[i], rng)
                    else:
                        click = uniform_error_click(pred[i], gt[i], rng)
                    if click is None:  # nothing left to correct: a padding point
                        labs[i, 0] = -1
                    else:
                        pts[i, 0] = click.ijk
                        labs[i, 0] = click.label
                        history[i].append((click.ijk, int(click.label)))
            if self.click_memory == "all" and any(history):
                pts, labs = _pad_history(history)
            elif not (has_point and self.click_memory == "newest"):
                return None, None
            return torch.from_numpy(pts).to(device), torch.from_numpy(labs).to(device)

        return prompts

    def _device_prompts(self, targets: torch.Tensor, rng: np.random.Generator) -> Callable:
        """The same ``prompts`` with ``clicks_torch`` simulating on the prediction where it is,
        for the whole batch; its generator is seeded from ``rng``. Windows without an error get a
        padding point (label -1), which with ``click_memory="all"`` also stays in the history."""
        from .clicks_torch import sim_clicks

        device, b = targets.device, targets.shape[0]
        gen = torch.Generator(device=device)
        gen.manual_seed(int(rng.integers(2**62)))
        gt = targets[:, 0] > 0.5
        hist_p = targets.new_zeros((b, 0, 3))
        hist_l = torch.zeros((b, 0), dtype=torch.long, device=device)

        def prompts(has_point: bool, logits: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            nonlocal hist_p, hist_l
            points = labels = None
            if has_point:
                pred = torch.zeros_like(gt) if logits is None else (logits.detach() > CLICK_SIM_LOGIT)[:, 0]
                interior = [self.click_sim == "mixed" and bool(rng.random() < 0.5) for _ in range(b)]
                points, labels = sim_clicks(pred, gt, interior, gen)
                if self.click_memory == "all":
                    hist_p, hist_l = torch.cat((hist_p, points), 1), torch.cat((hist_l, labels), 1)
            if self.click_memory == "all" and hist_l.shape[1]:
                return hist_p, hist_l
            return points, labels

        return prompts


def _last_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-window Dice of the thresholded last logits (1 for an empty target and prediction)."""
    with torch.no_grad():
        p = (logits.detach() > 0).float()
        inter = (p * targets).flatten(1).sum(1)
        denom = p.flatten(1).sum(1) + targets.flatten(1).sum(1)
        return torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom))


def _pad_history(history: Sequence[Sequence[tuple[tuple[int, int, int], int]]]) -> tuple[np.ndarray, np.ndarray]:
    """Every window's clicks so far as (B, N, 3) points and (B, N) labels, N the longest
    history; shorter ones padded with label -1 (ignored by the prompt encoder)."""
    n = max(len(h) for h in history)
    pts = np.zeros((len(history), n, 3), np.float32)
    labs = np.full((len(history), n), -1, np.int64)
    for i, h in enumerate(history):
        for j, (ijk, lab) in enumerate(h):
            pts[i, j] = ijk
            labs[i, j] = lab
    return pts, labs


def freeze_never_trained(sam: nn.Module) -> list[str]:
    """Freeze the parameters the published recipe never trains; returns their names."""
    frozen = []
    for name, p in sam.named_parameters():
        if name.startswith(NEVER_TRAINED):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def param_groups(sam: nn.Module, lr: float, weight_decay: float, prompt_lr_scale: float = 0.1) -> list[dict[str, Any]]:
    """The published groups: image encoder at ``lr``, prompt encoder and mask decoder at
    ``lr * prompt_lr_scale`` (0.1); only parameters that require grad (LoRA: the adapters)."""
    groups = []
    for prefix, scale in (("image_encoder.", 1.0), ("prompt_encoder.", prompt_lr_scale), ("mask_decoder.", prompt_lr_scale)):
        params = [p for n, p in sam.named_parameters() if n.startswith(prefix) and p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr * scale, "weight_decay": weight_decay, "name": prefix[:-1]})
    if not groups:
        raise BosamError("no trainable parameters")
    return groups


def batch_tensors(patches: Sequence[Patch], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    images = torch.from_numpy(np.stack([p.image for p in patches])[:, None]).to(device, non_blocking=True)
    gt = np.stack([p.target for p in patches])
    targets = torch.from_numpy(gt[:, None].astype(np.float32)).to(device, non_blocking=True)
    return images, targets, gt


def others_tensor(patches: Sequence[Patch], device: torch.device) -> torch.Tensor:
    """(B, 1, S, S, S) float 0/1: every other label's voxels in each window."""
    arr = np.stack([p.others if p.others is not None else np.zeros_like(p.target) for p in patches])
    return torch.from_numpy(arr[:, None].astype(np.float32)).to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# distributed set-up, RNG states


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_env() -> tuple[int, int, int]:
    """WORLD_SIZE, RANK and LOCAL_RANK as torchrun sets them, checked: a stale RANK=1 from a
    scheduler's environment made a run train as a non-main process, silently writing nothing."""
    def read(name: str, default: int, low: int) -> int:
        text = os.environ.get(name, str(default)).strip()
        if not re.fullmatch(r"[0-9]+", text) or int(text) < low:
            raise BosamError(f"environment variable {name}={text!r}: expected a whole number >= {low} (as torchrun sets it)")
        return int(text)

    world = read("WORLD_SIZE", 1, 1)
    rank = read("RANK", 0, 0)
    local = read("LOCAL_RANK", 0, 0)
    if rank >= world:
        raise BosamError(f"environment variable RANK={rank}: must be below WORLD_SIZE={world} (a stale RANK "
                         "from another job? start several processes with torchrun)")
    if world > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")) and "RANK" in os.environ:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        raise BosamError(f"environment variable {missing[0]}: not set, but WORLD_SIZE={world} asks for a "
                         "distributed run; start it with torchrun")
    if world > 1 and "RANK" not in os.environ:
        raise BosamError(f"environment variable RANK: not set, but WORLD_SIZE={world} asks for a distributed run; "
                         "start it with torchrun")
    return world, rank, local


def setup_distributed(device: str | None) -> Dist:
    """Read torchrun's environment; init the process group (NCCL on CUDA, gloo on CPU)."""
    world, rank, local = _dist_env()
    want_cuda = (device is None and torch.cuda.is_available()) or (device is not None and device.startswith("cuda"))
    if want_cuda and not torch.cuda.is_available():
        raise BosamError(f"--device {device}: torch sees no CUDA GPU here")
    if want_cuda:
        if device and ":" in device and world == 1:
            dev = torch.device(device)
        else:
            dev = torch.device("cuda", local)
        if (dev.index or 0) >= torch.cuda.device_count():
            if world > 1:
                raise BosamError(
                    f"--device {device or 'auto'}: torchrun started {os.environ.get('LOCAL_WORLD_SIZE', world)} processes "
                    f"on this node but torch sees {torch.cuda.device_count()} CUDA GPU(s); use --nproc_per_node "
                    f"{torch.cuda.device_count()}, or --device cpu for CPU processes"
                )
            raise BosamError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA GPU(s) here")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain types/tensors (``weights_only``-loadable)."""
    np_state = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
        "has_gauss": int(n["has_gauss"]),
        "gauss": float(n["gauss"]),
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# logging


class RunLog:
    """CSV log (+ TensorBoard scalars when tensorboard is installed); rank 0 only."""

    def __init__(self, out_dir: Path, resume_step: int | None, tensorboard: bool) -> None:
        self.path = out_dir / "log.csv"
        rows: list[dict[str, str]] = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r.get("step") or 0) <= resume_step]
        self.file = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=LOG_FIELDS)
        self.writer.writeheader()
        for r in rows:
            self.writer.writerow({k: r.get(k, "") for k in LOG_FIELDS})
        self.file.flush()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed run rewrites the steps after its checkpoint: TensorBoard drops the
                # events a killed run logged past it, as the CSV drops its rows
                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None

    def write(self, **row: Any) -> None:
        self.writer.writerow({k: _fmt(row.get(k)) for k in LOG_FIELDS})
        self.file.flush()
        if self.tb is not None:
            step = int(row["step"])
            for key in ("loss", "dice", "lr", "samples_per_s"):
                if row.get(key) is not None:
                    self.tb.add_scalar(f"{row['phase']}/{key}", float(row[key]), step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


# ---------------------------------------------------------------------------------------------
# the trainer


@dataclass
class TrainResult:
    out_dir: Path
    last: Path | None
    best: Path | None
    final: Path | None
    epochs_done: int
    global_step: int
    best_dice: float | None
    history: list[dict[str, Any]]
    stopped_early: bool = False


def _resolve_preprocessing(cfg: TrainConfig, meta: dict[str, Any]) -> tuple[float, tuple[float, float] | None]:
    from .segment import window_spacing

    spacing = window_spacing(cfg.spacing_mm, meta or {})  # what segment and engine folders take
    if cfg.no_clamp:
        clamp = None
    elif cfg.clamp_hu is not None:
        clamp = tuple(float(v) for v in cfg.clamp_hu)
    else:
        m = (meta.get("intensity") or {}).get("clamp_hu", list(DEFAULT_CLAMP_HU)) if meta else list(DEFAULT_CLAMP_HU)
        clamp = tuple(float(v) for v in m) if m else None
    return spacing, clamp  # type: ignore[return-value]


def _build_model(cfg: TrainConfig, resume_ck: Any | None, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The model to train and the metadata of where it came from."""
    from .checkpoints import load_model, read_checkpoint
    from .model import build_preset
    from .model.lora import apply_lora

    origin: dict[str, Any] = {}
    if resume_ck is not None:
        model = load_model(checkpoint=resume_ck)
        origin = dict((resume_ck.metadata or {}).get("init") or {})
    elif cfg.init_from:
        ck = read_checkpoint(cfg.init_from)
        model = load_model(checkpoint=ck, preset=cfg.preset)
        # what described the source run's making does not describe this one ("init" records it)
        for key in ("lora", "bundled"):
            model.checkpoint_metadata.pop(key, None)
        origin = {"from": str(cfg.init_from), "sha256": ck.sha256, "layout": ck.layout}
    elif cfg.preset:
        try:
            model = build_preset(cfg.preset)
        except ValueError as exc:
            raise BosamError(f"--preset: {exc}") from None
        model.checkpoint_metadata = {}
        origin = {"from": None, "preset": cfg.preset, "note": "random initialisation"}
    else:
        raise BosamError("give --from CKPT to fine-tune a checkpoint, or --preset NAME to train from scratch")
    model = model.to(device)
    if cfg.lora_rank:
        qkv = model.image_encoder.blocks[0].attn.qkv
        width = int(getattr(qkv, "qkv", qkv).in_features)
        if cfg.lora_rank > width:  # a rank past the block width adds nothing but size (5.5 GB at 100000)
            raise BosamError(f"--lora-rank {cfg.lora_rank}: above the encoder's width {width}, the most a "
                             "low-rank update of its q and v can use (BoSAM's LoRA uses 4)")
        apply_lora(model, cfg.lora_rank)
        if resume_ck is not None:
            lora = (resume_ck.container or {}).get("lora")
            if not isinstance(lora, dict):
                raise BosamError(f"{resume_ck.path}: has no LoRA tensors to resume a --lora-rank run from")
            own = model.state_dict()
            missing = [k for k in lora if k not in own or own[k].shape != lora[k].shape]
            if missing:
                raise BosamError(f"{resume_ck.path}: LoRA tensors do not fit rank {cfg.lora_rank} ({missing[0]} ...)")
            with torch.no_grad():
                for k, v in lora.items():
                    own[k].copy_(v)
    else:
        freeze_never_trained(model)
    model.train()
    return model, origin


def _steps_per_epoch(cfg: TrainConfig, n_cases: int, world: int) -> int:
    if cfg.steps_per_epoch:
        return int(cfg.steps_per_epoch)
    return max(1, math.ceil(n_cases / (cfg.batch_size * world * cfg.accumulation)))


def _check_config(cfg: TrainConfig) -> None:
    if cfg.loss not in LOSSES:
        raise BosamError(f"--loss must be one of {', '.join(LOSSES)}, not {cfg.loss!r}")
    if cfg.click_sim not in CLICK_SIMS:
        raise BosamError(f"--click-sim must be one of {', '.join(CLICK_SIMS)}, not {cfg.click_sim!r}")
    if not cfg.neighbour_weight >= 0:
        raise BosamError(f"--neighbour-weight must be >= 0, got {cfg.neighbour_weight}")
    if cfg.click_memory not in CLICK_MEMORIES:
        raise BosamError(f"--click-memory must be one of {', '.join(CLICK_MEMORIES)}, not {cfg.click_memory!r}")
    if cfg.click_sim_on not in CLICK_SIM_ON:
        raise BosamError(f"--click-sim-on must be one of {', '.join(CLICK_SIM_ON)}, not {cfg.click_sim_on!r}")
    if cfg.precision not in PRECISIONS:
        raise BosamError(f"--precision must be one of {', '.join(PRECISIONS)}, not {cfg.precision!r}")
    for name in ("epochs", "batch_size", "accumulation", "clicks", "steps_per_epoch", "threads", "val_cases",
                 "val_clicks", "val_labels_per_case", "stop_after_steps"):
        value = getattr(cfg, name)
        if value is not None and int(value) < 1:
            raise BosamError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name, flag in (("checkpoint_every", "--checkpoint-every"), ("workers", "--workers"), ("max_shift_vox", "--max-shift")):
        if int(getattr(cfg, name)) < 0:
            raise BosamError(f"{flag} must be >= 0, got {getattr(cfg, name)}")
    if not 0 <= int(cfg.seed) < 2**32:  # the window and click streams are seeded with 32 bits
        raise BosamError(f"--seed must be in 0 .. 2**32-1, got {cfg.seed}")
    for name in ("lr", "spacing_mm"):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise BosamError(f"--{name.replace('_mm', '').replace('_', '-')} must be a finite number above 0, got {value}")
    # NaN here trained NaN weights and exited 0
    for name, top in (("weight_decay", None), ("prompt_lr_scale", None), ("spacing_jitter", 0.5), ("intensity_jitter", 1.0)):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0 and (top is None or value <= top)):
            rule = f"in 0 .. {top}" if top is not None else "a finite number >= 0"
            raise BosamError(f"--{name.replace('_', '-')} must be {rule}, got {value}")
    if cfg.threads is not None and int(cfg.threads) > MAX_THREADS:
        raise BosamError(f"--threads must be at most {MAX_THREADS}, got {cfg.threads}")
    if cfg.lora_rank < 0:
        raise BosamError(f"--lora-rank must be >= 0, got {cfg.lora_rank}")
    if cfg.merge_lora and not cfg.lora_rank:
        raise BosamError("--merge-lora needs --lora-rank R")
    for d in list(cfg.data) + list(cfg.val_data):
        if not Path(d).is_dir():
            raise BosamError(f"{d}: no such dataset folder")


class _BatchQueue:
    """Training batches in run order, prepared ``workers`` ahead in background threads. Each batch
    is a pure function of (seed, rank, epoch, step, micro-batch), so prefetching changes nothing."""

    def __init__(self, sampler: PatchSampler, seed: int, rank: int, batch_size: int,
                 order: list[tuple[int, int, int]], workers: int) -> None:
        self.sampler, self.seed, self.rank, self.batch_size = sampler, seed, rank, batch_size
        self.order = order
        self.workers = workers
        self.pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
        self.pending: dict[tuple[int, int, int], Any] = {}
        self.next_index = 0

    def _make(self, epoch: int, step: int, micro: int) -> list[Patch]:
        return self.sampler.batch(patch_rng(self.seed, self.rank, epoch, step, micro, 0), self.batch_size)

    def next(self, key: tuple[int, int, int]) -> list[Patch]:
        i = self.next_index
        if self.order[i] != key:
            raise RuntimeError(f"batch order mismatch: expected {self.order[i]}, asked for {key}")
        self.next_index += 1
        if self.pool is None:
            return self._make(*key)
        for j in range(i, min(i + 1 + self.workers, len(self.order))):
            if self.order[j] not in self.pending:
                self.pending[self.order[j]] = self.pool.submit(self._make, *self.order[j])
        return self.pending.pop(key).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def resolve_auto(cfg: TrainConfig, device_type: str) -> dict[str, str]:
    """What ``--click-sim-on`` and ``--precision`` mean on a device of this type: ``auto`` is
    clicks on the device and fp16 on CUDA, on the host and fp32 elsewhere."""
    cuda = device_type == "cuda"
    return {
        "click_sim_on": cfg.click_sim_on if cfg.click_sim_on != "auto" else ("device" if cuda else "host"),
        "precision": cfg.precision if cfg.precision != "auto" else ("fp16" if cuda else "fp32"),
    }


#: flags that may change on --resume without changing the weights: where the run goes and how it
#: is reported, how long it runs (more epochs continue the same schedule), validation, the device
#: (its ``auto`` settings are compared by what they resolve to)
_RESUME_FREE = frozenset({"out_dir", "resume", "checkpoint_every", "stop_after_steps", "workers", "threads",
                          "tensorboard", "cache", "skip_bad", "safetensors", "device", "epochs", "merge_lora",
                          "val_data", "val_cases", "val_clicks", "val_labels_per_case"})
#: optimiser settings restored from the checkpoint's optimiser state whatever the flags say
_KEPT_ON_RESUME = frozenset({"lr", "prompt_lr_scale", "weight_decay"})


def _open_resume(cfg: TrainConfig, last_path: Path, world: int,
                 device_type: str = "cpu") -> tuple[Any, dict[str, Any], list[str]]:
    """(checkpoint, train_state, warnings) of the run to resume; (None, {}, []) for a new run.

    Besides changed flags, it warns when an ``auto`` setting resolves differently on this
    device (a run started on a GPU and resumed on a CPU simulates its clicks on the host and
    trains in fp32), since that too makes the resumed run differ from an uninterrupted one."""
    from .checkpoints import read_checkpoint

    if cfg.resume and not last_path.exists():
        raise BosamError(f"{last_path}: nothing to resume (no last.pth in --out)")
    if not cfg.resume and last_path.exists():
        raise BosamError(f"{last_path}: exists; pass --resume to continue that run, or choose another --out")
    if not cfg.resume:
        return None, {}, []
    ck = read_checkpoint(last_path, keep_container=True)
    state = dict((ck.container or {}).get("train_state") or {})
    if not state:
        raise BosamError(f"{last_path}: not a bosam training checkpoint (no train_state)")
    old = state.get("config", {})
    if int(old.get("lora_rank", 0)) != int(cfg.lora_rank):
        raise BosamError(f"{last_path}: was trained with --lora-rank {old.get('lora_rank', 0)}, not {cfg.lora_rank}")
    warnings = []
    now = cfg.plain()
    for k in sorted(now):
        if k in _RESUME_FREE or k not in old or old[k] == now[k]:
            continue
        if k in ("preset", "init_from") and now[k] is None:  # left out: the model comes from last.pth
            continue
        if k in _KEPT_ON_RESUME:
            warnings.append(f"--{k.replace('_', '-')} changed from {old[k]!r} to {now[k]!r}: ignored, a resumed "
                            "run keeps the learning rates and weight decay of its optimiser state")
        elif k in ("preset", "init_from"):
            warnings.append(f"--{'from' if k == 'init_from' else k} changed from {old[k]!r} to {now[k]!r}: ignored, "
                            f"a resumed run goes on with the model in {last_path.name}")
        else:
            warnings.append(f"--{k.replace('_', '-')} changed from {old[k]!r} to {now[k]!r}: "
                            "the resumed run will not match an uninterrupted one")
    reached = int(state.get("epoch", 0)) + (1 if int(state.get("step_in_epoch", 0)) > 0 else 0)
    if cfg.epochs < reached:
        raise BosamError(f"--epochs {cfg.epochs}: {last_path} is already in epoch {reached}; give --epochs {reached} or more")
    if int(state.get("world_size", 1)) != world:
        warnings.append(f"world size changed from {state.get('world_size')} to {world}")
    before = (ck.metadata or {}).get("training") or {}  # keeps the values the flags resolved to
    said = {"click_sim_on": "clicks simulated on the {}", "precision": "precision {}"}
    for flag, value in resolve_auto(cfg, device_type).items():
        what, was = said[flag], before.get(flag)
        if was is not None and was != value and old.get(flag) == now.get(flag):
            warnings.append(f"--{flag.replace('_', '-')} {now.get(flag)} resolves on {device_type} to "
                            f"{what.format(value)}, not {what.format(was)} as before: "
                            "the resumed run will not match an uninterrupted one")
    return ck, state, warnings


def _data_changed(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the data a resumed run trained on and what the flags select now:
    the label ids (the same --labels can resolve differently when dataset.json or the label map
    changed) or the cases. Either makes the resumed run differ from an uninterrupted one."""
    if not before:
        return []
    tail = ": the resumed run will not match an uninterrupted one"
    old_ids, new_ids = before.get("label_ids"), now.get("label_ids")
    if old_ids is not None and list(old_ids) != list(new_ids):
        return [f"the selected labels are now ids {', '.join(map(str, new_ids))}; the run trained on "
                f"{', '.join(map(str, old_ids))}{tail}"]
    def counts(summary: dict[str, Any]) -> dict[str, Any]:  # a renamed label is no change of data
        return {k: (v.get("cases"), v.get("voxels")) for k, v in (summary.get("labels") or {}).items()}

    if before.get("cases") != now.get("cases") or counts(before) != counts(now):
        return [f"the dataset changed since the run started ({now.get('cases')} usable cases, "
                f"{before.get('cases')} then; or their label voxels differ){tail}"]
    return []


class _Run:
    """The state of one training run (model, optimiser, schedule, counters) and its checkpoints.
    Only rank 0 writes; every rank takes part in gathering the RNG states."""

    def __init__(self, cfg: TrainConfig, dist_info: Dist, resume_ck: Any, state: dict[str, Any], scan: Any) -> None:
        self.cfg, self.dist, self.scan = cfg, dist_info, scan
        self.out_dir = Path(cfg.out_dir)
        self.model, self.origin = _build_model(cfg, resume_ck, dist_info.device)
        meta = dict(getattr(self.model, "checkpoint_metadata", {}) or {})
        if resume_ck is not None:  # the run's own preprocessing, whatever the flags say now
            self.spacing = float(meta.get("spacing_mm", DEFAULT_SPACING_MM))
            c = (meta.get("intensity") or {}).get("clamp_hu")
            self.clamp: tuple[float, float] | None = tuple(c) if c else None  # type: ignore[assignment]
        else:
            self.spacing, self.clamp = _resolve_preprocessing(cfg, meta)
        self.lr = cfg.lr if cfg.lr is not None else (5e-4 if cfg.lora_rank else 1e-4)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, self.lr, cfg.weight_decay, cfg.prompt_lr_scale), betas=(0.9, 0.999))
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(self.optimizer, T_0=5, T_mult=2)
        auto = resolve_auto(cfg, dist_info.device.type)
        precision = auto["precision"]
        if precision == "fp16" and dist_info.device.type != "cuda":
            raise BosamError("--precision fp16 needs a CUDA device (use fp32 or bf16 on CPU)")
        self.precision = precision
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        autocast_dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.sim_on = auto["click_sim_on"]
        loop = ClickLoop(self.model, build_loss(cfg.loss), cfg.detach_mask, cfg.upsample, autocast_dtype, cfg.click_sim,
                         cfg.neighbour_weight, cfg.click_memory, self.sim_on)
        self.runner: nn.Module = loop.to(dist_info.device)
        if dist_info.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
            self.runner = DDP(self.runner, device_ids=ids)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_dice: float | None = None
        self.sums: dict[str, float] = {"loss": 0.0, "dice": 0.0, "n": 0}
        if state:
            c = resume_ck.container
            self.optimizer.load_state_dict(c["optimizer"])
            self.scheduler.load_state_dict(c["scheduler"])
            old_lr = (state.get("config") or {}).get("lr")  # the rate the restored optimiser runs at
            self.lr = old_lr if old_lr is not None else (5e-4 if cfg.lora_rank else 1e-4)
            if c.get("scaler"):
                self.scaler.load_state_dict(c["scaler"])
            states = c.get("rng") or []
            if dist_info.rank < len(states):
                set_rng_state(states[dist_info.rank])
            self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
            self.global_step = int(state["global_step"])
            self.best_dice = state.get("best_dice")
            self.sums = dict(state.get("epoch_sums") or self.sums)
        self.label_ids = sorted({lab for info in scan.infos for lab in info.labels})
        self.patch = PatchConfig(
            spacing_mm=self.spacing, size=self.model.img_size, clamp_hu=self.clamp, max_shift_vox=cfg.max_shift_vox,
            min_fg_mm3=cfg.min_fg_mm3, flip=cfg.flip, intensity_scale=cfg.intensity_jitter,
            intensity_shift=cfg.intensity_jitter, spacing_jitter=cfg.spacing_jitter,
        )
        self.sampler = PatchSampler(CaseStore(scan.infos, cfg.cache), self.patch)
        self.steps = _steps_per_epoch(cfg, len(scan.infos), dist_info.world)
        self.data_summary = scan.summary()
        if self.sampler.too_small:
            self.data_summary["too_small_for_patch_rule"] = [f"{k}:{lab}" for k, lab in self.sampler.too_small]

    # -- one optimiser step ---------------------------------------------------------------------
    def train_step(self, batches: _BatchQueue, epoch: int, step: int) -> tuple[float, float]:
        """Accumulate ``accumulation`` micro-batches, step the optimiser; (loss, Dice) averaged
        over micro-batches and ranks."""
        cfg, d = self.cfg, self.dist
        step_loss, step_dice = 0.0, 0.0
        for micro in range(cfg.accumulation):
            patches = batches.next((epoch, step, micro))
            images, targets, gt = batch_tensors(patches, d.device)
            others = others_tensor(patches, d.device) if cfg.neighbour_weight else None
            click_rng = patch_rng(cfg.seed, d.rank, epoch, step, micro, 1)
            schedule = training_schedule(cfg.clicks, click_rng)
            sync = contextlib.nullcontext()
            if d.world > 1 and micro < cfg.accumulation - 1:
                sync = self.runner.no_sync()  # type: ignore[operator]
            with sync:
                loss, dice = self.runner(images, targets, gt, schedule, click_rng, others)
                self.scaler.scale(loss / cfg.accumulation).backward()
            step_loss += float(loss.detach()) / cfg.accumulation
            step_dice += float(dice.mean()) / cfg.accumulation
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        step_loss, step_dice = _mean_across(d, step_loss, step_dice)
        self.sums["loss"] += step_loss
        self.sums["dice"] += step_dice
        self.sums["n"] += 1
        return step_loss, step_dice

    @property
    def lr_now(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- checkpoints ----------------------------------------------------------------------------
    def metadata(self, epochs_done: int, extra_training: dict[str, Any]) -> dict[str, Any]:
        """Plain-types metadata: what ``segment`` needs (spacing, clamp, labels) and how it was made."""
        cfg = self.cfg
        meta: dict[str, Any] = {
            "spacing_mm": self.spacing,
            "intensity": {"clamp_hu": list(self.clamp) if self.clamp else None, "pad_value": 0.0},
            "click_memory": self.cfg.click_memory,
            "label_ids": self.label_ids,
            "label_names": {str(i): self.scan.label_names.get(i, f"label_{i}") for i in self.label_ids},
            "data": self.data_summary,
            "init": self.origin,
            "training": {
                "config": cfg.plain(),
                "epochs_done": epochs_done,
                "global_step": self.global_step,
                "steps_per_epoch": self.steps,
                "world_size": self.dist.world,
                "device": self.dist.device.type,
                "precision": self.precision,
                "click_sim_on": self.sim_on,
                "lr": self.lr,
                "patch": self.patch.as_dict(),
                **extra_training,
            },
        }
        if cfg.lora_rank:
            meta["lora"] = {"rank": cfg.lora_rank, "targets": "q,v of every image-encoder block", "merged_in_weights": True}
        return meta

    def _rng_states(self) -> list[dict[str, Any]]:
        mine = rng_state()
        if self.dist.world == 1:
            return [mine]
        import torch.distributed as dist

        states: list[Any] = [None] * self.dist.world
        dist.all_gather_object(states, mine)
        return states

    def save_last(self, epoch: int, step_in_epoch: int, extra_training: dict[str, Any]) -> Path:
        """``last.pth``: weights + everything an exact resume needs (collective: call on every rank)."""
        from .checkpoints import save_checkpoint
        from .model.lora import lora_tensors

        path = self.out_dir / LAST
        rngs = self._rng_states()
        if not self.dist.main:
            return path
        extra: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": rngs,
            "train_state": {
                "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": self.global_step,
                "best_dice": self.best_dice, "epoch_sums": dict(self.sums), "world_size": self.dist.world,
                "config": self.cfg.plain(),
            },
        }
        if self.cfg.lora_rank:
            extra["lora"] = lora_tensors(self.model)
        return save_checkpoint(self.model, path, metadata=self.metadata(epoch, extra_training), extra=extra)

    def save_best(self, epochs_done: int, info: dict[str, Any]) -> Path:
        from .checkpoints import save_checkpoint

        return save_checkpoint(self.model, self.out_dir / BEST, metadata=self.metadata(epochs_done, {**info, "best": True}))

    def save_final(self) -> Path:
        """``final.pth`` (and ``final.safetensors``): weights and metadata; the LoRA adapters too
        unless ``merge_lora``."""
        from .checkpoints import save_checkpoint
        from .model.lora import lora_tensors

        cfg = self.cfg
        meta = self.metadata(cfg.epochs, {"final": True, "best_val_dice": self.best_dice})
        extra: dict[str, Any] = {}
        if cfg.lora_rank and not cfg.merge_lora:
            extra["lora"] = lora_tensors(self.model)
        if cfg.merge_lora:
            meta["lora"]["adapters"] = "merged and dropped"
        path = save_checkpoint(self.model, self.out_dir / FINAL, metadata=meta, extra=extra)
        if cfg.safetensors:
            save_checkpoint(self.model, self.out_dir / "final.safetensors", metadata=meta)
        return path


def train(cfg: TrainConfig, console: Any = None, on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Run training as configured; returns where the checkpoints are and the history."""
    _check_config(cfg)
    dist_info = setup_distributed(cfg.device)
    out_dir = Path(cfg.out_dir)
    made_out = dist_info.main and not out_dir.exists()
    try:
        return _train(cfg, dist_info, console, on_step)
    except BaseException:
        # a run that fails before writing anything (bad --from, bad dataset) leaves no empty --out
        if made_out and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    finally:
        if dist_info.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _train(cfg: TrainConfig, dist_info: Dist, console: Any, on_step: Callable[[dict[str, Any]], None] | None) -> TrainResult:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    elif dist_info.device.type == "cpu" and dist_info.world > 1:
        # several processes on one CPU: share the cores instead of oversubscribing them
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist_info.world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    out_dir = Path(cfg.out_dir)
    refuse_output_in_dataset(out_dir, [*cfg.data, *(cfg.val_data or [])], "--out")
    if out_dir.exists() and not out_dir.is_dir():
        raise BosamError(f"{out_dir}: is a file; --out is the run folder (checkpoints and log)")
    if dist_info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        from .atomic import remove_stale_temps

        # a run killed while writing a checkpoint leaves its hidden temp file (hundreds of MB)
        remove_stale_temps(out_dir, (LAST, BEST, FINAL, "final.safetensors"))
    resume_ck, state, warnings = _open_resume(cfg, out_dir / LAST, dist_info.world, dist_info.device.type)
    if state:  # the model comes from last.pth: record where the run's model really came from
        before = state.get("config") or {}
        cfg = dataclasses.replace(cfg, preset=before.get("preset"), init_from=before.get("init_from"))
    seed_everything(cfg.seed + dist_info.rank)
    if dist_info.device.type == "cuda" and dist_info.world > 1:
        torch.backends.cudnn.deterministic = True

    scan = scan_dataset(cfg.data, cfg.labels, cfg.labelmap, ("Tr",), cfg.cache)
    refuse_errors(scan, cfg.skip_bad, "training")
    val_scan = None
    if cfg.val_data:
        val_scan = scan_dataset(cfg.val_data, cfg.labels, cfg.labelmap, ("Tr", "Val", "Ts"), cfg.cache,
                                max_cases=cfg.val_cases)
        refuse_errors(val_scan, cfg.skip_bad, "validation")

    if resume_ck is not None:
        warnings += _data_changed(((resume_ck.metadata or {}).get("data") or {}), scan.summary())
    run = _Run(cfg, dist_info, resume_ck, state, scan)
    start_epoch, start_step = run.epoch, run.step_in_epoch
    order = [(e, s, m) for e in range(start_epoch, cfg.epochs)
             for s in range(start_step if e == start_epoch else 0, run.steps) for m in range(cfg.accumulation)]
    batches = _BatchQueue(run.sampler, cfg.seed, dist_info.rank, cfg.batch_size, order, cfg.workers)
    log = RunLog(out_dir, run.global_step if state else None, cfg.tensorboard) if dist_info.main else None
    progress = _Progress(console, dist_info.main, cfg.epochs, run.steps)
    result = TrainResult(out_dir, None, None, None, start_epoch, run.global_step, run.best_dice, [])
    if dist_info.main and console is not None:
        from rich.markup import escape

        for w in warnings + [str(p) for p in scan.warnings]:
            console.print(f"[yellow]warning:[/] {escape(w)}")
    t_start = time.perf_counter()
    stopped = False
    try:
        for epoch in range(start_epoch, cfg.epochs):
            first = start_step if epoch == start_epoch else 0
            progress.start_epoch(epoch, first)
            for step in range(first, run.steps):
                t0 = time.perf_counter()
                loss, dice = run.train_step(batches, epoch, step)
                dt = time.perf_counter() - t0
                row = dict(phase="train", epoch=epoch, step=run.global_step, loss=loss, dice=dice, lr=run.lr_now,
                           samples_per_s=cfg.batch_size * cfg.accumulation * dist_info.world / max(dt, 1e-9),
                           elapsed_s=time.perf_counter() - t_start)
                if log is not None:
                    log.write(**row)
                if on_step is not None and dist_info.main:
                    on_step(row)
                progress.advance(loss, dice, 1.0 / max(dt, 1e-9))
                if step == run.steps - 1:
                    break  # the epoch's end writes last.pth
                due = bool(cfg.checkpoint_every) and run.global_step % cfg.checkpoint_every == 0
                stop = bool(cfg.stop_after_steps) and run.global_step >= cfg.stop_after_steps
                if due or stop:
                    result.last = run.save_last(epoch, step + 1, {"loss": loss})
                if stop:
                    stopped = True
                    break
            if stopped:
                break
            # -- end of epoch: validate, step the schedule, write checkpoints ------------------
            n = max(1, int(run.sums["n"]))
            row = {"epoch": epoch, "loss": run.sums["loss"] / n, "dice": run.sums["dice"] / n, "val_dice": None,
                   "lr": run.lr_now}
            if val_scan is not None and dist_info.main:
                row["val_dice"] = validate(run.model, dist_info.device, val_scan, cfg, run.spacing, run.clamp, cfg.val_cases)
                run.model.train()
                if log is not None and row["val_dice"] is not None:
                    log.write(phase="val", epoch=epoch, step=run.global_step, dice=row["val_dice"],
                              elapsed_s=time.perf_counter() - t_start)
            run.scheduler.step()
            run.sums = {"loss": 0.0, "dice": 0.0, "n": 0}
            improved = row["val_dice"] is not None and (run.best_dice is None or row["val_dice"] > run.best_dice)
            if improved:
                run.best_dice = float(row["val_dice"])
            info = {"loss": row["loss"], "train_dice": row["dice"], "val_dice": row["val_dice"]}
            result.last = run.save_last(epoch + 1, 0, info)
            if improved and dist_info.main:
                result.best = run.save_best(epoch + 1, info)
            result.history.append(row)
            progress.end_epoch(row)
            result.epochs_done = epoch + 1
            if cfg.stop_after_steps and run.global_step >= cfg.stop_after_steps and epoch + 1 < cfg.epochs:
                stopped = True
                break
        if not stopped and dist_info.main:
            result.final = run.save_final()
        if dist_info.world > 1:
            import torch.distributed as dist

            dist.barrier()  # nobody leaves while rank 0 still writes
    finally:
        progress.stop()
        batches.close()
        if log is not None:
            log.close()
    result.global_step = run.global_step
    result.best_dice = run.best_dice
    result.stopped_early = stopped
    if (out_dir / BEST).exists():
        result.best = out_dir / BEST
    return result


def _mean_across(d: Dist, *values: float) -> tuple[float, ...]:
    if d.world == 1:
        return tuple(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return tuple(float(v) / d.world for v in t.tolist())


def validate(model: nn.Module, device: torch.device, scan: Any, cfg: TrainConfig, spacing: float,
             clamp: tuple[float, float] | None, max_cases: int) -> float | None:
    """Mean Dice after ``cfg.val_clicks`` clicks of the evaluate ``clicks`` protocol on the
    first ``max_cases`` validation cases (at most ``val_labels_per_case`` labels each)."""
    from engines.torch_engine import TorchEngine

    from .evaluate import run_clicks_protocol
    from .session import Session
    from .windows import Intensity

    engine = TorchEngine(model, device=str(device))
    session = Session(engine, spacing_mm=spacing, intensity=Intensity(clamp_hu=clamp), max_windows=4,
                      click_memory=cfg.click_memory)  # validated the way segment will feed its clicks
    records = run_clicks_protocol(session, scan, cfg.val_clicks, max_cases=max_cases,
                                  labels_per_case=cfg.val_labels_per_case, nsd_tolerance_mm=None)
    final = [r.dice for r in records if r.click == cfg.val_clicks]
    return float(np.mean(final)) if final else None


class _Progress:
    """Rich progress bar (rank 0, terminals) with loss, Dice and it/s; a line per epoch otherwise."""

    def __init__(self, console: Any, enabled: bool, epochs: int, steps: int) -> None:
        self.console = console
        self.enabled = enabled and console is not None
        self.epochs, self.steps = epochs, steps
        self.bar = None
        self.task = None
        if self.enabled and getattr(console, "is_terminal", False):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  Dice {task.fields[dice]:.3f}  {task.fields[rate]:.2f} it/s"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=console,
            )
            self.bar.start()

    def start_epoch(self, epoch: int, done: int) -> None:
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task("", total=self.steps, completed=done, epoch=epoch + 1, epochs=self.epochs,
                                          loss=float("nan"), dice=float("nan"), rate=0.0)

    def advance(self, loss: float, dice: float, rate: float) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1, loss=loss, dice=dice, rate=rate)

    def end_epoch(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        val = f", validation Dice {row['val_dice']:.3f}" if row.get("val_dice") is not None else ""
        self.console.print(f"epoch {row['epoch'] + 1}/{self.epochs}: loss {row['loss']:.4f}, Dice {row['dice']:.3f}{val}")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
