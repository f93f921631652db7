"""Typed configuration: defaults < recipe YAML < dotted `key=value` overrides, merged by OmegaConf.

Every section is a dataclass with one-line field docs; `__post_init__` rejects impossible values, OmegaConf rejects
unknown keys and values of the wrong type. All errors become `ConfigError` with the dotted key in the message, raised
before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from vitforge.constants import DEFAULT_MAX_IMAGE_PIXELS
from vitforge.errors import ConfigError


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def _yaml_bool(value: str, false: str, true: str) -> str:
    """YAML reads `off`/`on`/`no`/`yes` as booleans, which reach a str field as 'False'/'True': map them back."""
    return {"False": false, "True": true}.get(value, value)


def _check(key: str, ok: bool, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {what}")


@dataclass
class ModelConfig:
    name: str = "vit_demo"
    """Registered model (`vitforge models`), or `timm:<name>` / `tv:<name>` for library backbones."""
    args: dict[str, Any] = field(default_factory=dict)
    """Extra constructor arguments, e.g. `model.args.depth=6`."""
    drop_path_rate: float | None = None
    """Stochastic depth; None keeps the model's default."""
    pretrained: str | None = None
    """Initial weights: a local file (.safetensors/.pth/.bin/.pt checkpoint), `hub`, or a named source."""
    head_dropout: float | None = None
    """Dropout on the features entering the classifier (timm:/tv: backbones); None keeps the model's default."""

    def __post_init__(self) -> None:
        _check("model.name", bool(self.name), "must not be empty")
        if self.drop_path_rate is not None:
            _check("model.drop_path_rate", 0.0 <= self.drop_path_rate < 1.0, "must be in [0, 1)")
        if self.head_dropout is not None:
            _check("model.head_dropout", 0.0 <= self.head_dropout < 1.0, "must be in [0, 1)")


def _pair(key: str, value: list[float], lo: float, hi: float, what: str) -> None:
    _check(key, len(value) == 2 and lo < value[0] <= value[1] <= hi, f"must be [min, max] with {what}")


@dataclass
class AugConfig:
    """Training augmentation. Each option is one entry of `vitforge.data.augmentations.AUGMENTATIONS`, which runs it
    on either path (torchvision transforms v2 in DataLoader workers, or batched on the training device) in the order:
    pre-resize, crop, flip, rotation, affine, AutoAugment, TrivialAugment, RandAugment, colour jitter; then, on the
    normalised batch on the device, random erasing."""

    crop_padding: int = 4
    """Random crop with this zero padding (small images on the device); 0 disables."""
    hflip: bool = True
    """Random horizontal flip."""
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """RandomResizedCrop area range (fraction of the image)."""
    rrc_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    """RandomResizedCrop aspect-ratio range (width / height)."""
    crop: str = "auto"
    """Random crop: pad (random crop with `crop_padding`), rrc (RandomResizedCrop with `rrc_scale`/`rrc_ratio`),
    auto (pad for images of at most 64 px, which are kept on the device; rrc for larger ones)."""
    pre_resize: int | None = None
    """Resize every training image to pre_resize x pre_resize before the random crop (e.g. 416 for 384 crops)."""
    rotate: float = 0.0
    """RandomRotation by an angle uniform in [-rotate, rotate] degrees (black corners); 0 disables."""
    affine_translate: float = 0.0
    """RandomAffine shift, uniform up to this fraction of the width (x) and of the height (y); 0 disables."""
    affine_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """RandomAffine zoom factor range [min, max]; [1, 1] disables."""
    affine_shear: float = 0.0
    """RandomAffine shear parallel to the x axis, uniform in [-shear, shear] degrees; 0 disables."""
    auto_augment: str | None = None
    """AutoAugment policy: cifar10, imagenet or svhn."""
    trivial_augment: bool = False
    """TrivialAugmentWide."""
    rand_augment: str | None = None
    """RandAugment as `n<ops>m<magnitude>`, e.g. n2m9 (magnitude a bin of 31: 0-30)."""
    color_jitter: float = 0.0
    """Brightness/contrast/saturation jitter strength."""
    hue: float = 0.0
    """Colour-jitter hue shift, uniform in [-hue, hue] (fraction of the hue circle, at most 0.5); 0 disables."""
    random_erasing: float = 0.0
    """RandomErasing probability."""
    erasing_scale: list[float] = field(default_factory=lambda: [0.02, 1 / 3])
    """RandomErasing area range (fraction of the image) [min, max]."""
    repeats: int = 1
    """Repeated augmentation: each image appears this many times per epoch with independent augmentations."""
    backend: str = "auto"
    """Where per-sample policies run: auto, device (batched on the training device) or workers (CPU DataLoader)."""

    def __post_init__(self) -> None:
        if self.pre_resize is not None:
            _check("data.aug.pre_resize", self.pre_resize >= 1, "must be >= 1")
        _choice("data.aug.crop", self.crop, ("auto", "pad", "rrc"))
        _check("data.aug.crop_padding", self.crop_padding >= 0, "must be >= 0")
        _pair("data.aug.rrc_scale", self.rrc_scale, 0, 1, "0 < min <= max <= 1")
        _pair("data.aug.rrc_ratio", self.rrc_ratio, 0, float("inf"), "0 < min <= max")
        _check("data.aug.rotate", 0 <= self.rotate <= 180, "must be in [0, 180] degrees")
        _check("data.aug.affine_translate", 0 <= self.affine_translate <= 1, "must be a fraction in [0, 1]")
        _pair("data.aug.affine_scale", self.affine_scale, 0, float("inf"), "0 < min <= max")
        _check("data.aug.affine_shear", 0 <= self.affine_shear < 90, "must be in [0, 90) degrees")
        if self.auto_augment is not None:
            _choice("data.aug.auto_augment", self.auto_augment, ("cifar10", "imagenet", "svhn"))
        if self.rand_augment is not None:
            _check("data.aug.rand_augment", self.rand_augment_args is not None,
                   f"{self.rand_augment!r} is not of the form n<ops>m<magnitude> with a magnitude of 0-30, e.g. n2m9")
        _check("data.aug.random_erasing", 0.0 <= self.random_erasing <= 1.0, "must be a probability in [0, 1]")
        _pair("data.aug.erasing_scale", self.erasing_scale, 0, 1, "0 < min <= max <= 1")
        _check("data.aug.color_jitter", self.color_jitter >= 0, "must be >= 0")
        _check("data.aug.hue", 0 <= self.hue <= 0.5, "must be in [0, 0.5]")
        _check("data.aug.repeats", self.repeats >= 1, "must be >= 1")
        _choice("data.aug.backend", self.backend, ("auto", "device", "workers"))

    @property
    def rand_augment_args(self) -> tuple[int, int] | None:
        """(num_ops, magnitude) of `rand_augment` (magnitude a bin of torchvision's 31), None if unset or malformed."""
        m = re.fullmatch(r"n(\d+)m(\d+)", self.rand_augment or "")
        if m is None or int(m.group(2)) >= RAND_AUGMENT_BINS:
            return None
        return int(m.group(1)), int(m.group(2))


RAND_AUGMENT_BINS = 31  # torchvision RandAugment's default num_magnitude_bins


def _epoch_or_fraction(key: str, value: float | None) -> None:
    if value is not None:
        _check(key, value >= 0 and (value < 1 or float(value).is_integer()),
               "must be an epoch (a whole number) or a fraction of train.epochs in (0, 1)")


_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m(?:in)?)?(?:(\d+(?:\.\d*)?)s)?")


def parse_duration(value: str | float, key: str = "train.budget") -> float:
    """Seconds of a duration: a number of seconds (900, "900", "12.5") or hours/minutes/seconds ("90s", "15m",
    "2h", "1h30m", "1.5h"). Anything else, or a duration that is not > 0, is a `ConfigError` naming `key`."""
    text = str(value).strip().lower().replace(" ", "")
    try:
        secs = float(text)
    except ValueError:
        m = _DURATION.fullmatch(text)
        secs = -1.0 if m is None or not any(m.groups()) else (
            3600 * float(m.group(1) or 0) + 60 * float(m.group(2) or 0) + float(m.group(3) or 0))
    if not (secs > 0 and math.isfinite(secs)):
        raise ConfigError(f"{key}: {value!r} is not a duration > 0: seconds (900) or 90s, 15m, 2h, 1h30m")
    return secs


def epoch_at(value: float, epochs: int) -> int:
    """An epoch given as a whole number (0-based epoch) or as a fraction in (0, 1) of `epochs` (rounded up)."""
    return int(value) if value == 0 or value >= 1 else math.ceil(value * epochs - 1e-9)


@dataclass
class MixConfig:
    mixup_alpha: float = 0.0
    """Mixup Beta(α, α); 0 disables."""
    cutmix_alpha: float = 0.0
    """CutMix Beta(α, α); 0 disables."""
    prob: float = 1.0
    """Probability that a batch is mixed at all."""
    switch_prob: float = 0.5
    """With both enabled: probability that a mixed batch uses CutMix instead of Mixup."""
    on_epoch: float = 0.0
    """Mixing starts at this epoch (0-based), or at this fraction of train.epochs when in (0, 1); set it to
    train.head_epochs to mix in fine-tuning phase 2 only."""
    off_epoch: float | None = None
    """From this epoch (0-based) on, or from this fraction of train.epochs when in (0, 1), no mixing."""

    def __post_init__(self) -> None:
        _check("data.mix.mixup_alpha", self.mixup_alpha >= 0, "must be >= 0")
        _check("data.mix.cutmix_alpha", self.cutmix_alpha >= 0, "must be >= 0")
        _check("data.mix.prob", 0.0 <= self.prob <= 1.0, "must be a probability in [0, 1]")
        _check("data.mix.switch_prob", 0.0 <= self.switch_prob <= 1.0, "must be a probability in [0, 1]")
        _epoch_or_fraction("data.mix.on_epoch", self.on_epoch)
        _epoch_or_fraction("data.mix.off_epoch", self.off_epoch)

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def active(self, epoch: int, epochs: int) -> bool:
        """Whether batches of `epoch` (0-based) of an `epochs`-epoch run are mixed: enabled, and on_epoch <= epoch <
        off_epoch."""
        if not self.enabled or epoch < epoch_at(self.on_epoch, epochs):
            return False
        return self.off_epoch is None or epoch < epoch_at(self.off_epoch, epochs)


@dataclass
class HsiConfig:
    """Hyperspectral scenes (SClusterFormer): used when `data.train` is a cube file (.mat or .npy)."""

    gt: str | None = None
    """Ground-truth map (H, W) file, integers, 0 = unlabelled."""
    extra_band: str | None = None
    """Band stacked after the PCA components (upstream: one EMAP band, `PaviaU_EMAP.mat`)."""
    cube_key: str | None = None
    """Variable name of the cube inside a .mat file (default: the largest 3-D array)."""
    gt_key: str | None = None
    """Variable name of the ground truth inside a .mat file."""
    extra_key: str | None = None
    """Variable name of the extra band inside a .mat file (upstream: Feature_E)."""
    pca_components: int = 30
    """Whitened PCA components kept."""
    patch_size: int = 13
    """Window side around each labelled pixel."""
    train_fraction: float = 0.05
    """Stratified training fraction; every other labelled pixel is held out (the upstream protocol)."""
    seed: int = 345
    """Split seed (upstream: 345)."""
    class_names: list[str] | None = None
    """Names of classes 1..K of the ground truth (default: "1".."K")."""

    def __post_init__(self) -> None:
        _check("data.hsi.pca_components", self.pca_components >= 1, "must be >= 1")
        _check("data.hsi.patch_size", self.patch_size >= 1 and self.patch_size % 2 == 1, "must be an odd size >= 1")
        _check("data.hsi.train_fraction", 0 < self.train_fraction < 1, "must be in (0, 1)")


@dataclass
class DataConfig:
    train: str = "digits"
    """Training source: parquet file, ImageFolder dir, CIFAR batches dir, CSV (file,label), `digits`, `cifar10`, or
    `auto`: the ImageFolder or label CSV found under /kaggle/input or $VITFORGE_INPUT_ROOT (`vitforge.data.inputs`)."""
    val: str | None = None
    """Explicit validation source; if None, a stratified `val_split` of `train` is held out."""
    val_split: float = 0.1
    """Fraction (0-1) or count (>= 1) of training images held out for validation when `val` is None."""
    split_seed: int = 0
    """Seed of the stratified split (fixed, independent of the training seed)."""
    folds: int | None = None
    """K-fold cross-validation (`vitforge cv`): split `train` into this many stratified folds (seed `split_seed`)."""
    fold: int | None = None
    """With `folds`: the fold held out for validation (0-based); `val_split` is then unused."""
    extra: str | None = None
    """Extra labelled training data appended to `train` (e.g. a pseudo-label CSV)."""
    limit: int | None = None
    """Use a stratified subset of this many training images (quick experiments)."""
    img_size: int | None = None
    """Model input size; None = the images' own size for small images, else the model's default."""
    mean: list[float] | None = None
    """Normalisation mean (RGB, 0-1 scale); None = computed from the training images (fast path) or ImageNet's."""
    std: list[float] | None = None
    """Normalisation std; None as for `mean`."""
    interpolation: str = "bilinear"
    """Resize interpolation: bilinear, bicubic or nearest."""
    crop_pct: float = 1.0
    """Evaluation: resize to img_size / crop_pct, then centre-crop img_size."""
    batch_size: int | str = 128
    """Training batch size per process (before gradient accumulation), or `auto`: the largest batch that fits in a
    trial training step on the CUDA device, times 0.9 (on CPU/MPS no search: 32); the run's saved config holds the
    number chosen, so a resume uses it (`vitforge.train.oom`)."""
    eval_batch_size: int | None = None
    """Evaluation batch size; None = 2 x batch_size (the resolved one when batch_size is auto)."""
    num_workers: int = 2
    """DataLoader worker processes (large-image path); capped at the usable cores, kept alive across epochs."""
    device_cache: str = "auto"
    """Small-image fast path (decode once, keep uint8 on the device): auto (images <= 64 px), on, off."""
    cache_dir: str | None = None
    """Where decoded tensors are cached; None = ~/.cache/vitforge."""
    download: bool = False
    """Allow downloading a named dataset (cifar10/cifar100) when it is not found locally."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Images with more pixels (width x height) are skipped unread and listed as unreadable (decompression bombs)."""
    aug: AugConfig = field(default_factory=AugConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    hsi: HsiConfig = field(default_factory=HsiConfig)

    def __post_init__(self) -> None:
        _check("data.train", bool(self.train), "must name a dataset path")
        _check("data.val_split", 0 <= self.val_split < 1 or float(self.val_split).is_integer(),
               "must be a fraction in [0, 1) or a whole number of images")
        if self.folds is not None or self.fold is not None:
            _check("data.folds", self.folds is not None and self.folds >= 2, "must be >= 2 (cross-validation folds)")
            _check("data.fold", self.fold is not None and 0 <= self.fold < self.folds,
                   f"must be a fold index in [0, {self.folds}) when data.folds is set")
            _check("data.val", self.val is None, "cannot be combined with data.folds (the held-out fold validates)")
        if isinstance(self.batch_size, str) and self.batch_size.strip().isdigit():  # "64" from a quoted YAML value
            self.batch_size = int(self.batch_size)
        ok = self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size >= 1)
        _check("data.batch_size", ok, f"{self.batch_size!r} is neither a whole number >= 1 nor auto")
        if self.eval_batch_size is not None:
            _check("data.eval_batch_size", self.eval_batch_size >= 1, "must be >= 1")
        if self.limit is not None:
            _check("data.limit", self.limit >= 2, "must be >= 2")
        if self.img_size is not None:
            _check("data.img_size", self.img_size >= 1, "must be >= 1")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is not None:
                _check(f"data.{key}", len(v) == 3, "must have 3 values (R, G, B)")
        if self.std is not None:
            _check("data.std", all(s > 0 for s in self.std), "values must be > 0")
        _choice("data.interpolation", self.interpolation, ("bilinear", "bicubic", "nearest"))
        _check("data.crop_pct", 0 < self.crop_pct <= 1, "must be in (0, 1]")
        _check("data.num_workers", self.num_workers >= 0, "must be >= 0")
        _check("data.max_image_pixels", self.max_image_pixels >= 1, "must be >= 1")
        self.device_cache = _yaml_bool(self.device_cache, "off", "on")
        _choice("data.device_cache", self.device_cache, ("auto", "on", "off"))

    @property
    def eval_batch(self) -> int | None:
        """The evaluation batch: `eval_batch_size`, else 2 x `batch_size`; None while `batch_size` is still auto (the
        caller's default applies)."""
        if self.eval_batch_size is not None:
            return self.eval_batch_size
        return 2 * self.batch_size if isinstance(self.batch_size, int) else None


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer: adamw, sgd or lamb."""
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.05
    """Decoupled weight decay (AdamW/LAMB) or L2 (SGD)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """SGD Nesterov momentum."""
    no_decay_norm_bias: bool = True
    """Exclude biases, norm weights and the model's `no_weight_decay()` names from weight decay."""
    layer_decay: float | None = None
    """Layer-wise lr decay factor (fine-tuning); None disables."""
    fused: bool | None = None
    """Fused optimizer kernels; None = on for CUDA."""
    sam_rho: float = 0.0
    """Sharpness-aware minimisation radius; 0 disables SAM."""
    sam_adaptive: bool = False
    """Adaptive SAM (ASAM): scale the perturbation by |w|."""

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("adamw", "sgd", "lamb"))
        _check("optim.lr", self.lr > 0, "must be > 0")
        _check("optim.weight_decay", self.weight_decay >= 0, "must be >= 0")
        _check("optim.betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               "must be two values in [0, 1)")
        _check("optim.momentum", 0 <= self.momentum < 1, "must be in [0, 1)")
        if self.layer_decay is not None:
            _check("optim.layer_decay", 0 < self.layer_decay <= 1, "must be in (0, 1]")
        _check("optim.sam_rho", self.sam_rho >= 0, "must be >= 0")


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """Learning-rate shape after warmup: cosine, linear or constant (evaluated per optimizer step)."""
    warmup_epochs: float = 0.0
    """Linear warmup length in epochs (fractions allowed)."""
    warmup_start: float = 0.0
    """Warmup starts at this fraction of the peak lr."""
    min_lr: float = 0.0
    """Final learning rate of the cosine/linear decay."""

    def __post_init__(self) -> None:
        _choice("schedule.name", self.name, ("cosine", "linear", "constant"))
        _check("schedule.warmup_epochs", self.warmup_epochs >= 0, "must be >= 0")
        _check("schedule.warmup_start", 0 <= self.warmup_start <= 1, "must be in [0, 1]")
        _check("schedule.min_lr", self.min_lr >= 0, "must be >= 0")


@dataclass
class EmaConfig:
    enabled: bool = False
    """Keep an exponential moving average of the weights (and float buffers)."""
    decay: float = 0.9998
    """EMA decay (at the start of training when `decay_end` is set)."""
    decay_end: float | None = None
    """If set, the decay ramps linearly per epoch from `decay` to this value (deit_kd recipe: 0.995 -> 0.9995)."""
    every: int = 1
    """Update every this many optimizer steps."""
    warmup: str = "tf"
    """Decay warm-up, so that a short run's average is not the initial weights: tf = min(decay, (1+n)/(10+n)) for the
    n-th update (TensorFlow), power = min(decay, 1 - (1 + n/warmup_gamma)^-warmup_power) (timm ModelEmaV3), off."""
    warmup_power: float = 0.75
    """Exponent of the `power` warm-up (timm: 2/3 for runs of a million steps or more, 3/4 for shorter ones)."""
    warmup_gamma: float = 1.0
    """Step scale of the `power` warm-up."""
    eval: bool = True
    """Validate (and choose best.pt) with the EMA weights."""

    def __post_init__(self) -> None:
        _check("ema.decay", 0 <= self.decay < 1, "must be in [0, 1)")
        if self.decay_end is not None:
            _check("ema.decay_end", 0 <= self.decay_end < 1, "must be in [0, 1)")
        _check("ema.every", self.every >= 1, "must be >= 1")
        self.warmup = _yaml_bool(self.warmup, "off", "tf")  # true/false of earlier versions and YAML on/off
        _choice("ema.warmup", self.warmup, ("tf", "power", "off"))
        _check("ema.warmup_power", self.warmup_power > 0, "must be > 0")
        _check("ema.warmup_gamma", self.warmup_gamma > 0, "must be > 0")


@dataclass
class DistillConfig:
    teacher: str | None = None
    """Teacher: a registered model, `timm:<name>`, or a vitforge checkpoint/run dir. None disables distillation."""
    kind: str = "soft"
    """soft (KL at temperature tau) or hard (teacher argmax as label)."""
    alpha: float = 0.5
    """Weight of the distillation term: (1 - alpha)·CE + alpha·KD."""
    tau: float = 1.0
    """Soft-KD temperature."""
    reduction: str = "batchmean"
    """Soft-KD reduction: batchmean (Hinton) or deit (sum / numel, DeiT's legacy code)."""

    def __post_init__(self) -> None:
        _choice("distill.kind", self.kind, ("soft", "hard"))
        _check("distill.alpha", 0 <= self.alpha <= 1, "must be in [0, 1]")
        _check("distill.tau", self.tau > 0, "must be > 0")
        _choice("distill.reduction", self.reduction, ("batchmean", "deit"))


@dataclass
class TrainConfig:
    epochs: int = 10
    """Training epochs."""
    max_steps: int | None = None
    """Stop after this many optimizer steps in total (quick runs); None = all epochs."""
    budget: str | None = None
    """Wall-clock budget of the whole run, setup, compilation and evaluations included: seconds (900) or 90s, 15m,
    2h, 1h30m. The run measures its speed over its first steps, then replaces train.epochs (and train.max_steps, which
    then only caps the plan) by the number of steps that ends inside the budget; every schedule (warmup, lr decay,
    EMA ramp, fractions of the run) follows that plan, which last.pt keeps for resume (`vitforge.train.budget`).
    None = no budget."""
    grad_accum: int = 1
    """Gradient accumulation steps per optimizer step."""
    clip_grad: float | None = None
    """Clip the global gradient norm to this value."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy targets."""
    smoothing_off_epoch: float | None = None
    """From this epoch (0-based) on, or from this fraction of train.epochs when in (0, 1), no label smoothing."""
    amp: str = "auto"
    """Mixed precision: auto (bf16 on CUDA, fp32 elsewhere), bf16, fp16 or off."""
    compile: str = "off"
    """torch.compile mode: off, default, reduce-overhead, max-autotune."""
    channels_last: bool = False
    """Use channels_last memory format for the model and inputs."""
    grad_checkpointing: bool = False
    """Recompute block activations in the backward pass (models that support it)."""
    eval_every: int = 1
    """Validate every this many epochs (and after the last)."""
    early_stop: int | None = None
    """Stop after this many validations without a new best top-1."""
    seed: int = 0
    """Seed for weights, augmentation and data order."""
    device: str = "auto"
    """auto (CUDA -> MPS -> CPU), cpu, cuda, cuda:N or mps."""
    deterministic: bool = False
    """Ask PyTorch for deterministic algorithms (slower on GPU)."""
    threads: int | None = None
    """CPU intra-op threads (torch.set_num_threads); None = PyTorch's default, capped on a CPU run at the cores this
    process may use (affinity, cgroup quota)."""
    ckpt_every_steps: int | None = None
    """Also save last.pt every this many optimizer steps inside an epoch (long epochs)."""
    ckpt_every_epochs: int = 1
    """Save last.pt every this many epochs (and always at the end); raise it when saving is a visible cost."""
    verify_attention: bool = True
    """Check attention shapes and softmax rows on the first step (models with hand-written attention)."""
    head_epochs: int = 0
    """Fine-tuning phase 1: train only the classifier head for this many epochs."""
    head_lr: float | None = None
    """Phase-1 learning rate; None = optim.lr."""
    class_balance: str = "none"
    """Imbalanced data: none, weights (inverse-frequency loss weights) or sampler (balanced sampling)."""

    def __post_init__(self) -> None:
        _check("train.epochs", self.epochs >= 1, "must be >= 1")
        if self.max_steps is not None:
            _check("train.max_steps", self.max_steps >= 1, "must be >= 1")
        if self.budget is not None:
            parse_duration(self.budget, "train.budget")
        _epoch_or_fraction("train.smoothing_off_epoch", self.smoothing_off_epoch)
        _check("train.grad_accum", self.grad_accum >= 1, "must be >= 1")
        if self.clip_grad is not None:
            _check("train.clip_grad", self.clip_grad > 0, "must be > 0")
        _check("train.label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)")
        self.amp = _yaml_bool(self.amp, "off", "auto")
        self.compile = _yaml_bool(self.compile, "off", "default")
        _choice("train.amp", self.amp, ("auto", "bf16", "fp16", "off"))
        _choice("train.compile", self.compile, ("off", "default", "reduce-overhead", "max-autotune"))
        _check("train.eval_every", self.eval_every >= 1, "must be >= 1")
        if self.early_stop is not None:
            _check("train.early_stop", self.early_stop >= 1, "must be >= 1")
        _check("train.device", self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"),
               f"{self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
        if self.threads is not None:
            _check("train.threads", self.threads >= 1, "must be >= 1")
        _check("train.ckpt_every_epochs", self.ckpt_every_epochs >= 1, "must be >= 1")
        if self.ckpt_every_steps is not None:
            _check("train.ckpt_every_steps", self.ckpt_every_steps >= 1, "must be >= 1")
        _check("train.head_epochs", 0 <= self.head_epochs < self.epochs, "must be in [0, train.epochs)")
        _choice("train.class_balance", self.class_balance, ("none", "weights", "sampler"))

    @property
    def budget_seconds(self) -> float | None:
        """`budget` in seconds (None without a budget)."""
        return None if self.budget is None else parse_duration(self.budget, "train.budget")


@dataclass
class RunConfig:
    name: str | None = None
    """Run directory name under `dir`; None = <model>-<dataset>-<timestamp>."""
    dir: str = "runs"
    """Parent directory of run directories."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    wandb: str = "off"
    """Weights & Biases logging: off, online or offline (offline writes under the run directory and needs no
    account; `wandb sync` uploads it later). Needs the `wandb` package: `pip install vitforge[wandb]`."""
    wandb_project: str = "vitforge"
    """W&B project the run is logged to."""
    wandb_entity: str | None = None
    """W&B entity (user or team); None = the account's default entity."""
    wandb_tags: list[str] = field(default_factory=list)
    """W&B tags of the run, e.g. [cifar10, baseline]."""
    mlflow: bool = False
    """MLflow logging (config as parameters, epoch metrics). Needs the `mlflow` package:
    `pip install vitforge[mlflow]`."""
    mlflow_uri: str | None = None
    """MLflow tracking URI; None = a file store in `<run dir>/mlruns` (no server; `mlflow ui --backend-store-uri
    <run dir>/mlruns` shows it)."""
    mlflow_experiment: str = "vitforge"
    """MLflow experiment name."""
    progress: str = "auto"
    """Progress display: auto (bar on a terminal, plain lines otherwise), bar, plain or none."""

    def __post_init__(self) -> None:
        if self.name is not None:
            _check("run.name", bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
                   f"{self.name!r} must be a plain directory name")
        self.wandb = _yaml_bool(self.wandb, "off", "online")
        _choice("run.wandb", self.wandb, ("off", "online", "offline"))
        _check("run.wandb_project", bool(self.wandb_project) and "/" not in self.wandb_project,
               f"{self.wandb_project!r} must be a non-empty name without '/'")
        if self.wandb_entity is not None:
            _check("run.wandb_entity", bool(self.wandb_entity), "must be a non-empty name or null")
        _check("run.wandb_tags", all(isinstance(t, str) and 0 < len(t) <= 64 for t in self.wandb_tags),
               f"{list(self.wandb_tags)!r}: each tag must be a string of 1 to 64 characters")
        if self.mlflow_uri is not None:
            _check("run.mlflow_uri", bool(self.mlflow_uri), "must be a tracking URI or null (file store in the run)")
        _check("run.mlflow_experiment", bool(self.mlflow_experiment), "must be a non-empty name")
        _choice("run.progress", self.progress, ("auto", "bar", "plain", "none"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:  # checks across sections
        w, e = self.schedule.warmup_epochs, self.train.epochs - self.train.head_epochs
        _check("schedule.warmup_epochs", w == 0 or w < e, f"must be smaller than the {e} training epoch(s) it warms "
               f"up (train.epochs minus train.head_epochs), else the learning rate never reaches its decay")
        mix, epochs = self.data.mix, self.train.epochs
        if mix.enabled:
            on = epoch_at(mix.on_epoch, epochs)
            _check("data.mix.on_epoch", on < epochs, f"epoch {on} is not before the end of training "
                   f"(train.epochs={epochs}): mixing would never start")
            if mix.off_epoch is not None:
                off = epoch_at(mix.off_epoch, epochs)
                _check("data.mix.off_epoch", on < off, f"epoch {off} is not after data.mix.on_epoch (epoch {on}): "
                       f"mixing would never happen")


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def load_config(recipe: str | Path | dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Merge defaults < recipe (YAML path or dict) < `key=value` overrides into a validated `Config`.

    Raises:
        ConfigError: unreadable recipe, unknown key, wrong type or impossible value (the message names the key).
    """
    merged = OmegaConf.structured(Config)
    layers: list[tuple[str | None, Any]] = []
    if isinstance(recipe, dict):
        layers.append((None, recipe))
    elif recipe is not None:
        layers.append((None, _read_yaml(Path(recipe))))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-3)")
        layers.append((item.split("=", 1)[0].strip(), OmegaConf.from_dotlist([item])))
    try:
        for key, layer in layers:  # one at a time, so that an error can name the override it came from
            try:
                merged = OmegaConf.merge(merged, layer)
            except OmegaConfBaseException as e:
                raise ConfigError(_explain(e, key)) from None
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e)) from None


def _read_yaml(path: Path) -> Any:
    import yaml

    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections ({', '.join(SECTIONS)})")
    return data


def _explain(e: OmegaConfBaseException, override: str | None = None) -> str:
    key = getattr(e, "full_key", None) or override or "?"
    if isinstance(e, ConfigKeyError):
        parent, _, leaf = key.rpartition(".")
        return f"{key}: unknown key; valid keys{' of ' + parent if parent else ''}: {', '.join(_valid_keys(parent))}"
    msg = str(e).splitlines()[0]
    if key in SECTIONS or _valid_keys(key):  # `optim=1`: a whole section given a value
        return f"{key}: is a section, not a value; set its keys (e.g. {key}.{_valid_keys(key)[0]}=...): " \
               f"{', '.join(_valid_keys(key))}"
    if "is not a ListConfig" in msg or "ListConfig" in msg:
        return f"{key}: expected a list, e.g. {key}=[0.9,0.999]"
    return f"{key}: {msg}"


def _valid_keys(parent: str) -> list[str]:
    node: Any = Config
    for part in filter(None, parent.split(".")):
        types = {f.name: f.default_factory for f in dataclasses.fields(node)}  # type: ignore[arg-type]
        factory = types.get(part)
        if factory is None or factory is dataclasses.MISSING or not dataclasses.is_dataclass(factory()):
            return []
        node = type(factory())
    return [f.name for f in dataclasses.fields(node)]


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (for checkpoints and JSON)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(d: dict) -> Config:
    """Rebuild a `Config` stored in a checkpoint (keys unknown to this version are an error naming them)."""
    return load_config(d)
