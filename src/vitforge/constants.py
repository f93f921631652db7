"""Normalisation constants, defined once.

ImageNet: the per-channel mean/std of the ILSVRC-2012 training set that torchvision's and timm's pretrained weights
expect (timm `timm/data/constants.py` IMAGENET_DEFAULT_MEAN/STD).
CIFAR-10: the per-channel mean/std of the 50,000 CIFAR-10 training images (0-1 scale), as used by the CIFAR
training scripts of the DeiT/CCT line of work (e.g. SHI-Labs/Compact-Transformers `main.py`).
Image size limit: PIL's own default `PIL.Image.MAX_IMAGE_PIXELS` (2**30 // 4 // 3 pixels, about 0.25 GiB of 8-bit
RGB; a 9459 x 9459 photo still decodes), the default of `data.max_image_pixels`.
"""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_NORM = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_NORM = {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
