"""The clean-room Sam3D reproduces the architecture and quirks the published weights need."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bosam_cli.model import build_preset
from bosam_cli.model.image_encoder import Attention3D
from conftest import REFERENCE, need


@pytest.mark.parametrize(
    "preset, manifest",
    [("sam-med3d", "sam_med3d_vit_b_ori.keys.json"), ("vit-b-256", "bosam_vit_b_e384_img256_unused.keys.json")],
)
def test_state_dict_keys_and_shapes_equal_reference_manifest(preset, manifest):
    ref = json.loads(need(REFERENCE / manifest).read_text())
    with torch.device("meta"):
        model = build_preset(preset)
    mine = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    theirs = [(e["key"], e["shape"]) for e in ref["keys"]]
    assert mine == theirs
    assert sum(p.numel() for p in model.parameters()) == ref["total_parameters"]
    buffers = [k for k, v in model.named_buffers() if k in model.state_dict()]
    assert buffers == ["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]


def _randomise(module: torch.nn.Module, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


@pytest.mark.parametrize("grid, window", [(8, 14), (8, 0), (4, 6), (8, 9)])
def test_fast_attention_equals_reference_formula(grid, window):
    attn = Attention3D(64, 2, grid, window).double()
    _randomise(attn, 0.4)
    x = torch.randn(2, grid, grid, grid, 64, dtype=torch.float64)
    attn.impl = "reference"
    ref = attn(x)
    attn.impl = "fast"
    fast = attn(x)
    assert torch.allclose(fast, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())


def test_fast_encoder_block_equals_reference_at_published_width():
    """Window-14 block of the sam-med3d width: fp32 agreement to 1e-5 relative."""
    torch.manual_seed(3)
    attn = Attention3D(768, 12, 8, 14)
    with torch.no_grad():
        for t in (attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w):
            t.normal_(0, 0.5)
        attn.qkv.bias.normal_(0, 0.5)
    x = torch.randn(1, 8, 8, 8, 768)
    with torch.inference_mode():
        attn.impl = "reference"
        ref = attn(x)
        attn.impl = "fast"
        fast = attn(x)
    rel = ((fast - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-5


def test_relative_position_term_is_the_misbroadcast_one():
    """Pin FACTS §1.4: bias(Q, K) = <q(qd,qh,qw),Rd[qd,kw]> + <q(qd,qh,kd),Rh[qh,kw]> + <q(qd,qh,kh),Rw[kh,kw]>."""
    s, c = 4, 8
    attn = Attention3D(c, 1, s, 0).double()
    _randomise(attn, 1.0)
    q = torch.randn(1, s * s * s, c, dtype=torch.float64)
    rd, rh, rw = attn._tables()
    r_q = q.reshape(1, s, s, s, c)
    rel_d = torch.einsum("bdhwc,dkc->bdhwk", r_q, rd)
    rel_h = torch.einsum("bdhwc,hkc->bdhwk", r_q, rh)
    rel_w = torch.einsum("bdhwc,wkc->bdhwk", r_q, rw)
    bias = rel_d[:, :, :, :, None, None] + rel_h[:, :, :, None, :, None] + rel_w[:, :, :, None, None, :]
    rng = np.random.default_rng(0)
    for _ in range(50):
        qd, qh, qw, kd, kh, kw = (int(v) for v in rng.integers(0, s, 6))
        table = lambda t, i, j: t[i - j + s - 1]  # noqa: E731
        expect = (
            r_q[0, qd, qh, qw] @ table(attn.rel_pos_d, qd, kw)
            + r_q[0, qd, qh, kd] @ table(attn.rel_pos_h, qh, kw)
            + r_q[0, qd, qh, kh] @ table(attn.rel_pos_w, kh, kw)
        )
        assert torch.isclose(bias[0, qd, qh, qw, kd, kh, kw], expect)
    # and it is not the textbook MViTv2 term
    textbook = r_q[0, 1, 2, 3] @ table(attn.rel_pos_d, 1, 0) + r_q[0, 1, 2, 3] @ table(
        attn.rel_pos_h, 2, 3
    ) + r_q[0, 1, 2, 3] @ table(attn.rel_pos_w, 3, 1)
    assert not torch.isclose(bias[0, 1, 2, 3, 0, 3, 1], textbook)


def test_windowed_block_attends_to_zero_padded_tokens():
    """The reference path pads the normed tokens with zeros at the end of each axis and lets
    every real query attend to them (q, k, v of a padded token = the qkv bias)."""
    attn = Attention3D(32, 2, 4, 6).double()
    _randomise(attn, 0.5)
    x = torch.randn(1, 4, 4, 4, 32, dtype=torch.float64)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 2, 0, 2, 0, 2))
    whole = attn._attend_reference(padded)[:, :4, :4, :4]
    attn.impl = "reference"
    assert torch.allclose(attn(x), whole)
    attn.impl = "fast"
    assert torch.allclose(attn(x), whole, atol=1e-9)


def test_point_and_dense_positional_encoding_conventions(tiny_model):
    pe = tiny_model.prompt_encoder.pe_layer
    g = pe.positional_encoding_gaussian_matrix

    def enc(c):
        c = (2 * torch.as_tensor(c, dtype=torch.float32) - 1) @ g * 2 * math.pi
        return torch.cat([torch.sin(c), torch.cos(c), torch.sin(c)], -1)

    dense = tiny_model.prompt_encoder.get_dense_pe()[0]  # (C, 8, 8, 8)
    a, b, c = 1, 5, 2
    # cell (a,b,c): first coordinate follows tensor dim 1, the second dim 0
    assert torch.allclose(dense[:, a, b, c], enc([(b + 0.5) / 8, (a + 0.5) / 8, (c + 0.5) / 8]), atol=1e-5)
    # points: (d0,d1,d2) + 0.5, / 128, no swap
    p = torch.tensor([[[10.0, 70.0, 100.0]]])
    got = pe.forward_with_coords(p + 0.5, (128, 128, 128))[0, 0]
    assert torch.allclose(got, enc([10.5 / 128, 70.5 / 128, 100.5 / 128]), atol=1e-5)


def test_point_is_most_similar_to_dense_cell_with_first_two_axes_swapped():
    torch.manual_seed(0)
    model = build_preset("sam-med3d")
    pe = model.prompt_encoder.pe_layer
    dense = model.prompt_encoder.get_dense_pe()[0].reshape(384, -1)
    for p0, p1, p2 in [(8, 100, 40), (120, 8, 70), (60, 30, 5)]:
        v = pe.forward_with_coords(torch.tensor([[[p0 + 0.5, p1 + 0.5, p2 + 0.5]]]), (128, 128, 128))[0, 0]
        best = int(torch.argmax(v @ dense))
        assert np.unravel_index(best, (8, 8, 8)) == (p1 // 16, p0 // 16, p2 // 16)


def test_padding_point_appended_and_labels_select_embeddings(tiny_model):
    pe = tiny_model.prompt_encoder
    pts = torch.tensor([[[3.0, 4.0, 5.0], [60.0, 61.0, 62.0]]])
    labels = torch.tensor([[1, 0]])
    sparse, dense = pe((pts, labels), None, torch.zeros(1, 1, 32, 32, 32))
    assert sparse.shape == (1, 3, pe.embed_dim)
    assert torch.allclose(sparse[0, 2], pe.not_a_point_embed.weight[0])
    raw = pe.pe_layer.forward_with_coords(pts + 0.5, (128, 128, 128))[0]
    assert torch.allclose(sparse[0, 0], raw[0] + pe.point_embeddings[1].weight[0], atol=1e-6)
    assert torch.allclose(sparse[0, 1], raw[1] + pe.point_embeddings[0].weight[0], atol=1e-6)
    # label -1 rows become not_a_point regardless of the coordinates
    s2, _ = pe((pts, torch.tensor([[-1, 0]])), None, torch.zeros(1, 1, 32, 32, 32))
    assert torch.allclose(s2[0, 0], pe.not_a_point_embed.weight[0])


def test_prompt_encoder_takes_the_reference_call_styles(tiny_model):
    """Code written against the reference calls prompt_encoder(points=..., boxes=None, masks=...)
    or positionally (points, None, masks); both must reach the mask, never the untrained
    no_mask_embed, and a box prompt (no weights for it) is refused."""
    pe = tiny_model.prompt_encoder
    pts, labels = torch.tensor([[[3.0, 4.0, 5.0]]]), torch.tensor([[1]])
    mask = torch.randn(1, 1, 32, 32, 32)
    sparse, dense = pe(points=(pts, labels), boxes=None, masks=mask)
    assert torch.equal(dense, pe.embed_mask(mask)) and torch.equal(sparse, pe.embed_points(pts, labels))
    s2, d2 = pe((pts, labels), None, mask)
    assert torch.equal(s2, sparse) and torch.equal(d2, dense)
    s3, d3 = pe(None, None, None)
    assert s3.shape == (1, 0, pe.embed_dim) and torch.equal(d3[0, :, 0, 0, 0], pe.no_mask_embed.weight[0])
    with pytest.raises(ValueError, match="box"):
        pe((pts, labels), torch.zeros(1, 6), mask)


def test_decode_shapes_and_mask_prompt_feedback(tiny_model):
    x = torch.randn(1, 1, 128, 128, 128)
    with torch.inference_mode():
        emb = tiny_model.image_encoder(x)
        assert emb.shape == (1, 192, 8, 8, 8)
        pts = torch.tensor([[[64.0, 64.0, 64.0]]])
        lab = torch.tensor([[1]])
        logits, iou = tiny_model.decode(emb, pts, lab, torch.zeros(1, 1, 32, 32, 32))
        assert logits.shape == (1, 1, 32, 32, 32) and iou.shape == (1, 1)
        again, _ = tiny_model.decode(emb, pts, lab, logits)
        assert not torch.allclose(again, logits)
        none_pts, _ = tiny_model.decode(emb, None, None, logits)
        assert none_pts.shape == (1, 1, 32, 32, 32)


def test_sam_med3d_encoder_output_shape_and_fast_path_default():
    model = build_preset("sam-med3d")
    assert all(b.attn.impl == "fast" for b in model.image_encoder.blocks)
    windows = [b.attn.window_size for b in model.image_encoder.blocks]
    assert windows == [14, 14, 0, 14, 14, 0, 14, 14, 0, 14, 14, 0]


def test_layernorm3d_matches_channel_formula():
    from bosam_cli.model.common import LayerNorm3d

    ln = LayerNorm3d(6)
    _randomise(ln, 1.0)
    x = torch.randn(2, 6, 3, 4, 5)
    u = x.mean(1, keepdim=True)
    s = ((x - u) ** 2).mean(1, keepdim=True)
    ref = ln.weight[:, None, None, None] * ((x - u) / torch.sqrt(s + 1e-6)) + ln.bias[:, None, None, None]
    assert torch.allclose(ln(x), ref, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "sam-med3d"])
def test_fast_upscaling_equals_the_transposed_convolutions(preset):
    """The matmul form of output_upscaling + mask projection (the default) equals the modules as
    written, for every mask token, for single-mask decode and for multimask output."""
    torch.manual_seed(0)
    model = build_preset(preset).eval()
    dec = model.mask_decoder
    _randomise(dec, 0.05)
    assert dec.fast_upscaling
    c = dec.transformer_dim
    emb = torch.randn(2, c, 8, 8, 8)
    pe = torch.randn(1, c, 8, 8, 8)
    sparse = torch.randn(2, 3, c)
    dense = torch.randn(2, c, 8, 8, 8)
    pts = torch.tensor([[[60.0, 50.0, 70.0], [30.0, 80.0, 90.0]]] * 2)
    lab = torch.tensor([[1, 0], [1, -1]])
    with torch.no_grad():
        fast = [dec.predict_masks(emb, pe, sparse, dense), dec(emb, pe, sparse, dense, True),
                model.decode(emb[:1], pts[:1], lab[:1], torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1)))]
        dec.fast_upscaling = False
        ref = [dec.predict_masks(emb, pe, sparse, dense), dec(emb, pe, sparse, dense, True),
               model.decode(emb[:1], pts[:1], lab[:1], torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1)))]
    assert fast[0][0].shape == (2, 4, 32, 32, 32) and fast[1][0].shape == (2, 3, 32, 32, 32)
    assert fast[2][0].shape == (1, 1, 32, 32, 32) and fast[2][1].shape == (1, 1)
    for (fm, fi), (rm, ri) in zip(fast, ref):
        scale = float(rm.abs().max())
        assert scale > 0 and float((fm - rm).abs().max()) <= 1e-5 * scale
        assert torch.equal(fi, ri)
