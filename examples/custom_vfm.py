"""Register your own vision foundation model as the source of ProxyCLIP's attention.

Any module returning dense features (B, C, h, w) works; here a torchvision ResNet-50 truncated after layer3
(stride 16, 1024 channels). Run:

    python examples/custom_vfm.py            # downloads CLIP ViT-B/16 and torchvision's ResNet-50 weights
    python examples/custom_vfm.py --random   # no downloads: seeded random weights
"""
import argparse

import torch
import torchvision

import ovseg
from ovseg.backbones import VFM


class ResNetFeatures(VFM):
    patch_size, embed_dim = 16, 1024  # stride and channels of layer3; mean/std default to ImageNet's

    def __init__(self, weights=None):
        super().__init__()
        net = torchvision.models.resnet50(weights=weights)
        self.body = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)

    def forward_features(self, x):  # (B, 3, H, W) ImageNet-normalised -> (B, 1024, H/16, W/16)
        return self.body(x)


def build_resnet(weights=None, seed=0):
    if weights == "random":
        torch.manual_seed(seed)
        return ResNetFeatures(None)
    return ResNetFeatures(torchvision.models.ResNet50_Weights.IMAGENET1K_V2)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--random", action="store_true", help="random weights, no downloads")
    args = ap.parse_args()
    ovseg.register_vfm("resnet50_l3", build_resnet, doc="torchvision ResNet-50 layer3 (stride 16)")
    kw = dict(clip_weights="random", vfm_weights="random") if args.random else {}
    seg = ovseg.Segmenter("proxyclip", vfm="resnet50_l3", **kw)
    import numpy as np

    img = (np.random.RandomState(0).rand(240, 320, 3) * 255).astype(np.uint8)
    res = seg.predict(img, ["sky", "grass", "tree"])
    print(seg, res.fractions())
