"""Shared fixtures: the repository on sys.path, tiny image folders and official-format checkpoints."""
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import models  # noqa: E402,F401  (registers cc_deit_* with timm)


def make_image_folder(root, classes=('a', 'b', 'c'), per_class=(4, 2), size=(40, 48), seed=0):
    """IMNET layout: root/train/<class>/*.png and root/val/<class>/*.png with random RGB images."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in zip(('train', 'val'), per_class):
        for c in classes:
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(d, f'{i}.png'))
    return str(root)


def official_checkpoint(path, model_name='cc_deit_tiny_patch16_224', seed=0, **kwargs):
    """An official-DeiT-format file: {"model": state_dict} with timm's keys and no masks."""
    import timm
    torch.manual_seed(seed)
    model = timm.create_model(model_name, **kwargs)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith('attn.token_index')}
    torch.save({'model': sd}, path)
    return str(path)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / 'data')
