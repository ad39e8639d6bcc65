"""Model code: SAMF equations, masking, the ViT's DINO compatibility, one class for tiny and real sizes."""

import torch

from samf.train.models import (
    SAMF,
    AggregatorConfig,
    FusionConfig,
    SliceAggregator,
    VisionTransformer,
    ViTConfig,
    load_dino_weights,
)


def _fusion(ao2d=True, d=16):
    torch.manual_seed(0)
    return SAMF(FusionConfig(d2d=12, d3d=10, d_text=14, d_proj=d, d_llm=20, ao2d=ao2d)).eval()


def _inputs(B=2, S=6, N=3, T=5):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, S, 12, generator=g), torch.randn(B, N, 10, generator=g), torch.randn(B, T, 14, generator=g),
            torch.ones(B, T, dtype=torch.long))


def test_shapes_and_distinct_volume_tokens():
    z2d, z3d, text, mask = _inputs()
    out = _fusion()(z2d, z3d, text, mask)
    assert out.shape == (2, 3, 20)
    assert not torch.allclose(out[:, 0], out[:, 1])  # N distinct tokens, not one vector repeated


def test_padded_text_tokens_get_no_weight():
    z2d, z3d, text, mask = _inputs()
    mask[:, 3:] = 0
    f = _fusion()
    ref = f(z2d, z3d, text, mask)
    text2 = text.clone()
    text2[:, 3:] = 1e3 * torch.randn_like(text2[:, 3:])
    assert torch.allclose(ref, f(z2d, z3d, text2, mask), atol=1e-5)
    # ... and dropping them entirely gives the same answer.
    assert torch.allclose(ref, f(z2d, z3d, text[:, :3], mask[:, :3]), atol=1e-5)


def test_matches_the_equations_written_out():
    z2d, z3d, text, mask = _inputs(B=1)
    f = _fusion()
    F2d, F3d, Ft = f.proj_2d(z2d)[0], f.proj_3d(z3d)[0], f.proj_text(text)[0]
    f3d = F3d.mean(0)
    s = f.cfg.d_proj ** -0.5
    alpha = torch.softmax(F2d @ f3d * s, 0)
    beta = torch.softmax(Ft @ f3d * s, 0)
    gamma = torch.softmax(Ft @ F2d.T * s, 1)
    A2d3d, At3d = alpha @ F2d, beta @ Ft
    At2d = (gamma @ F2d).mean(0)
    N = F3d.shape[0]
    cat = torch.cat([F3d, A2d3d.expand(N, -1), At3d.expand(N, -1), At2d.expand(N, -1)], 1)
    assert torch.allclose(f.fusion(cat), f(z2d, z3d, text, mask)[0], atol=1e-5)
    # The attention the runtime shows as evidence: α over the slices, γ averaged over the prompt's tokens.
    fused, a, g = f.attend(z2d, z3d, text, mask)
    assert torch.allclose(fused[0], f.fusion(cat), atol=1e-5)
    assert torch.allclose(a[0], alpha, atol=1e-6) and torch.allclose(g[0], gamma.mean(0), atol=1e-6)
    assert torch.allclose(a.sum(), torch.tensor(1.0)) and torch.allclose(g.sum(), torch.tensor(1.0))


def test_prompt_averaged_gamma_ignores_padded_tokens():
    z2d, z3d, text, mask = _inputs()
    mask[:, 3:] = 0
    f = _fusion()
    _, a, g = f.attend(z2d, z3d, text, mask)
    _, a_short, g_short = f.attend(z2d, z3d, text[:, :3], mask[:, :3])
    assert torch.allclose(g, g_short, atol=1e-6) and torch.allclose(a, a_short, atol=1e-6)


def test_without_ao2d_has_three_parts():
    f = _fusion(ao2d=False)
    assert f.fusion.in_features == 3 * f.cfg.d_proj
    z2d, z3d, text, mask = _inputs()
    assert f(z2d, z3d, text, mask).shape == (2, 3, 20)
    assert f.attend(z2d, z3d, text, mask)[2] is None  # no γ without the Ao2D term


def test_vit_b16_is_the_same_class_with_dino_sizes():
    vit = VisionTransformer(ViTConfig())  # DINO ViT-B/16 at 224
    n = sum(p.numel() for p in vit.parameters())
    assert 85_000_000 < n < 86_500_000  # 85.8M, as published


def test_loads_a_dino_checkpoint_with_prefixes_and_head(tmp_path):
    cfg = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    src = VisionTransformer(cfg)
    sd = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    sd["head.mlp.0.weight"] = torch.zeros(3, 3)
    torch.save({"teacher": sd}, tmp_path / "dino.pth")
    dst = VisionTransformer(cfg)
    load_dino_weights(dst, str(tmp_path / "dino.pth"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(src(x), dst(x))


def test_vit_handles_smaller_crops_by_interpolating_positions():
    vit = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4))
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 32)


def test_aggregator_gives_n_tokens():
    agg = SliceAggregator(AggregatorConfig(n_slices=6, n_tokens=4, dim=16, depth=1, num_heads=2, out_dim=8), 12)
    assert agg(torch.randn(2, 6, 12)).shape == (2, 4, 8)
