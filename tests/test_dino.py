"""DINO pretraining runs on slices of all three planes and lowers its loss."""

import numpy as np
import torch

from samf.runtime.scan.ct import Volume
from samf.runtime.scan.preprocess import PreprocessConfig, preprocess
from samf.runtime.tools.phantom import make_phantom
from samf.train.dino import DinoConfig, pretrain_dino, random_crops
from samf.train.models import VisionTransformer, ViTConfig


def _slices(n=24):
    cfg = PreprocessConfig(image_size=32, pixel_spacing_mm=12.0, slices_per_plane=4)
    return np.concatenate([preprocess(Volume(p.volume, p.spacing, ""), cfg)
                           for p in (make_phantom(s, shape=(40, 48, 48), spacing=(8.0, 8.0, 8.0)) for s in range(n))])


def test_short_dino_run_lowers_its_loss():
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4))
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    losses = pretrain_dino(vit, _slices(), DinoConfig(steps=60, batch_size=32, out_dim=256), progress=False)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.3
    assert np.mean(losses[-10:]) < np.log(256) - 0.5  # not collapsed to a uniform output
    assert any(not torch.equal(before[k], v) for k, v in vit.state_dict().items())


def test_crops_have_the_requested_sizes():
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    g = torch.Generator().manual_seed(0)
    crops = random_crops(x, 3, 16, (0.1, 0.4), g)
    assert len(crops) == 3 and all(c.shape == (5, 3, 16, 16) for c in crops)
    assert all(c.min() >= -1 and c.max() <= 1 for c in crops)
