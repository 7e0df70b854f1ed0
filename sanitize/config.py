"""Every default of the pipeline in one place: the CLI and the Python API both build these."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sanitize.errors import SanitizeError

DECODED_CACHE_MODES = ("auto", "on", "off")  # sanitize.data.decoded
FINETUNE_MODES = ("linear", "end-to-end")  # sanitize.finetuner: the last layer only, or every weight
SCHEDULES = ("step", "onecycle")  # sanitize.training.learning_rate


PAPER_NOISE_EPS = 16.0  # the friendly-noise paper's random component (mu = 16 of 255)


@dataclass
class TrainConfig:
    """From-scratch training recipe (the poisoning literature's: SGD + Nesterov, crop/flip, step decay)."""

    epochs: int = 8
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (3 / 8, 5 / 8, 7 / 8)  # fractions of the epochs; Witches' Brew's 14/24/35 of 40
    gamma: float = 0.1
    # step: the rate drops x gamma at each milestone; onecycle: it rises linearly from 0 to lr over the first quarter
    # of training and falls linearly to 0 by the end, set every batch. Under onecycle the
    # milestones only mark where robust training's rounds end.
    schedule: str = "step"
    augment: bool = True  # random crop with padding of 1/8 of the side + horizontal flip
    seed: int = 0
    # progressive resizing: the first `reduced_epochs` epochs see every batch with its shorter side resized to
    # `reduced_side` (area averaging, after the crop and flip), the others at the images' own size; None: off
    reduced_side: int | None = None
    reduced_epochs: int = 0
    # random noise: every pixel of every batch the network sees moves by +-noise_eps / 255, a fresh random sign each
    # time (the random component of Liu, Yang & Mirzasoleiman 2022's friendly-noise defense against poisoning; its
    # paper's value is PAPER_NOISE_EPS); 0: off
    noise_eps: float = 0.0
    # friendly noise: for every example the largest perturbation within +-friendly_eps / 255 that keeps the model's
    # prediction, found once early in training and added for the rest of it (sanitize/friendly.py); 0: off
    friendly_eps: float = 0.0

    def identity(self) -> dict[str, Any]:
        """The recipe as caches and resumes name it: every field, less the schedule while it is step decay, progressive
        resizing while it is off and each noise while it is off, so models trained before each was an option keep their
        names."""
        fields = dataclasses.asdict(self)
        if self.schedule == "step":
            del fields["schedule"]
        if self.reduced_side is None:
            del fields["reduced_side"], fields["reduced_epochs"]
        for noise in ("noise_eps", "friendly_eps"):
            if not fields[noise]:
                del fields[noise]
        return fields

    def checks(self) -> list[tuple[bool, str]]:
        """(holds, message) for the recipe's own constraints, which the commands' validate() add to theirs."""
        return [
            (self.schedule in SCHEDULES, "schedule must be step or onecycle"),
            (self.reduced_side is None or self.reduced_side >= 4, "reduced_side must be >= 4"),
            (
                self.reduced_side is None or 1 <= self.reduced_epochs < max(self.epochs, 1),
                "reduced_epochs must be >= 1 and fewer than epochs (the last epochs see the images' own size)",
            ),
            (0 <= self.noise_eps <= 255, "noise_eps must be in [0, 255]"),
            (0 <= self.friendly_eps <= 255, "friendly_eps must be in [0, 255]"),
        ]

    def side_at(self, epoch: int) -> int | None:
        """The side 0-based `epoch` resizes batches to (None: the images' own)."""
        return self.reduced_side if self.reduced_side is not None and epoch < self.reduced_epochs else None


@dataclass
class RobustConfig:
    """EPIC robust training (sanitize.robust): when to look for isolated examples and how many may go."""

    fraction: float = 0.2  # medoids per class as a share of the class (EPIC's subset size; 0.1-0.3 in its examples)
    every: int | None = None  # epochs between rounds; None: epochs / 8 (EPIC's 5 of 40)
    warmup: int = 1  # first epoch a round may run (EPIC's drop_after)
    max_dropped_fraction: float = 0.1  # cap on everything dropped, as a share of the data
    # reach the cap evenly over the rounds: after round r of R at most cap x r / R dropped in all (room a round leaves
    # carries on), so that late rounds still drop; off: the first rounds may spend the whole cap
    spread_cap: bool = False
    # the first round pooled over this many independently seeded runs (this one and pool_runs - 1 scouts, each trained
    # from scratch to the first round only); an example is isolated there when at least pool_votes of them isolate it.
    # 1: off, EPIC's single run (what one run's first round catches varies with its seed: reports/isolation-pool)
    pool_runs: int = 1
    pool_votes: int = 2

    def period(self, epochs: int) -> int:
        return self.every or max(1, round(epochs / 8))

    def identity(self) -> dict[str, Any]:
        """The settings as caches and resumes name them: every field, less the pooling while it is off, so runs trained
        before it was an option keep their names."""
        fields = dataclasses.asdict(self)
        if self.pool_runs == 1:
            del fields["pool_runs"], fields["pool_votes"]
        return fields

    def checks(self) -> list[tuple[bool, str]]:
        """(holds, message) for the settings' own constraints, which the commands' validate() add to theirs."""
        return [
            (0.0 < self.fraction <= 1.0, "fraction must be in (0, 1]"),
            (self.every is None or self.every >= 1, "every must be >= 1"),
            (0.0 <= self.max_dropped_fraction <= 1.0, "max_dropped_fraction must be in [0, 1]"),
            (self.pool_runs >= 1, "pool_runs must be >= 1"),
            (self.pool_runs == 1 or 1 <= self.pool_votes <= self.pool_runs, "pool_votes must be in [1, pool_runs]"),
        ]


def route_options(cls: type, options: dict[str, Any], nested: dict[str, type]) -> Any:
    """Build `cls` from flat keyword options; keys of a nested config (e.g. epochs -> train) go to that field."""
    own = {f.name for f in dataclasses.fields(cls)}
    routed = {
        name: {k: options.pop(k) for k in list(options) if k in {f.name for f in dataclasses.fields(kind)} - own}
        for name, kind in nested.items()
    }
    unknown = set(options) - own
    if unknown:
        raise SanitizeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    defaults = {
        f.name: f.default_factory for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING
    }
    for name, kind in nested.items():
        base = options.pop(name, None) or defaults.get(name, kind)()
        options[name] = dataclasses.replace(base, **routed[name])
    config = cls(**options)
    config.validate()
    return config


@dataclass
class FitConfig:
    """Options of `sanitize train`; `sanitize.train(data, **options)` takes the same names."""

    model: str = "auto"
    image_size: int | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    robust: bool = False
    epic: RobustConfig = field(default_factory=RobustConfig)
    test: str | None = None  # a labelled test set to report accuracy on
    # a file of example ids, one a line, left out of training: a scan's flagged.txt (scan, then train on what it kept:
    # with robust, the defence chosen at the full CIFAR-10 scale, reports/gradient-matching-full-tuning)
    exclude: str | None = None
    max_thumbnails: int = 48  # report.html shows at most this many dropped examples as images
    device: str = "auto"
    precision: str = "auto"
    workers: int = 0
    decoded_cache: str = "auto"  # folders and shards: keep decoded images while training (ScanConfig says more)
    seed: int = 0
    quiet: bool = False

    @classmethod
    def from_options(cls, **options: Any) -> FitConfig:
        return route_options(cls, options, {"train": TrainConfig, "epic": RobustConfig})

    def validate(self) -> None:
        checks = [
            (self.train.epochs >= 1 and self.train.batch_size >= 1, "epochs and batch_size must be >= 1"),
            *self.train.checks(),
            *self.epic.checks(),
            (self.precision in ("auto", "bf16", "fp32"), "precision must be auto, bf16 or fp32"),
            (self.max_thumbnails >= 0, "max_thumbnails must be >= 0"),
            (self.decoded_cache in DECODED_CACHE_MODES, "decoded_cache must be auto, on or off"),
        ]
        for ok, message in checks:
            if not ok:
                raise SanitizeError(message)


@dataclass
class FineTuneConfig:
    """Options of `sanitize finetune`; `sanitize.finetune(data, **options)` takes the same names. The recipe's defaults
    are the Bullseye Polytope reference's (sanitize.finetuner)."""

    checkpoint: str | None = None  # the pretrained weights to fine-tune (required)
    model: str = "auto"  # the checkpoint's architecture
    mode: str = "linear"  # linear: the last layer only; end-to-end: every weight
    epochs: int = 60
    batch_size: int = 64
    lr: float | None = None  # None: 0.1 linear, 1e-4 end-to-end (Adam)
    weight_decay: float | None = None  # None: 0 linear, 5e-4 end-to-end
    robust: bool = False  # EPIC's rounds after every epoch of the first quarter
    exclude: str | None = None  # a file of example ids, one a line, left out first: a scan's flagged.txt
    test: str | None = None  # a labelled test set to report accuracy on
    image_size: int | None = None
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    quiet: bool = False

    def validate(self) -> None:
        checks = [
            (self.checkpoint is not None, "fine-tuning needs --checkpoint, the pretrained weights"),
            (self.mode in FINETUNE_MODES, "mode must be linear or end-to-end"),
            (self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1"),
            (self.lr is None or self.lr > 0, "lr must be > 0"),
            (self.weight_decay is None or self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.precision in ("auto", "bf16", "fp32"), "precision must be auto, bf16 or fp32"),
        ]
        for ok, message in checks:
            if not ok:
                raise SanitizeError(message)


@dataclass
class ScanConfig:
    """Options of `sanitize scan`; `sanitize.scan(data, **options)` takes the same names. The detector's own options
    live in its file (sanitize/detectors/); flat names such as k_small reach them through `from_options`."""

    # a registry name, or auto: `convnet` for images up to 64 px, else `resnet18` (the summary names the one)
    model: str = "auto"
    checkpoint: str | None = None  # load these weights instead of training a proxy
    # the checkpoint never trained on DATA (e.g. the pretrained network a transfer learner fine-tunes): its predictions
    # are out of sample, as the folds' are, and knn_density's label check flags the labels it confidently contradicts
    held_out_checkpoint: bool = False
    image_size: int | None = None  # None: the most common size in the data
    # the proxy's recipe: 16 epochs, not 8, because the poisons only stand out once the proxy has learned them
    # (reports/detection-cpu: AUROC 0.68 -> 0.80 default rule, and the class alarm only fires from 16)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=16))
    # >= 2: also train this many proxies, each without one fold of the data, for every example's out-of-fold
    # prediction (knn_density's label check: labels the held-out proxies contradict); costs ~folds - 1 proxies more
    proxy_folds: int = 0
    sketch_dim: int = 1024  # last-layer gradients longer than exact_gradient_max are sketched to this many dims
    exact_gradient_max: int = 8192
    detector: str = "knn_density"  # or a baseline: epic, deep_knn, spectral_signatures, activation_clustering
    options: Any = None  # the detector's options dataclass; None: its defaults
    index: str = "auto"  # auto | flat | ivf | hnsw
    exact_max: int = 50_000  # classes up to this size use the exact index under auto
    max_flagged_fraction: float = 0.05  # the gate: fail when more than this fraction is flagged ...
    # ... or when a class raises the class alarm: a targeted attack's poisons are few (0.01-1%) and pass the fraction
    # gate while their class's alarm fires (reports/class-alarm: the poisoned sets whose victims flip, 2.5-3.3% flagged)
    fail_on_class_alarm: bool = True
    manifest: str | None = None  # a poison manifest (attack runs, audits of a defense): score the flags against it
    max_thumbnails: int = 48  # report.html shows at most this many flagged examples as images; scores.csv has all
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 where the device supports it) | bf16 | fp32
    eval_batch_size: int = 512
    workers: int = 0  # data-loading processes; 0 loads in the main process
    # folders and shards: read each file's header up front and decode it first in the proxy's training (or the
    # embedding pass), where a file that does not decode becomes a recorded skip; `full` decodes everything up front
    # too (each file decoded once more: 6.7x the header pass, hours for ImageNet-1k here, reports/imagenet-shaped)
    validation: str = "header"
    # folders and shards: keep each image once decoded (at the scan's size, in OUT/decoded, removed at the end) and
    # read it back in later passes instead of decoding the file again; auto: when the proxy is trained here and the
    # copy takes at most half the free disk (sanitize.data.decoded)
    decoded_cache: str = "auto"
    seed: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.options is None:
            from sanitize.detectors import detector_options  # the detectors need torch; configs are built before

            self.options = detector_options(self.detector)

    @classmethod
    def from_options(cls, **options: Any) -> ScanConfig:
        """Build a config from flat keyword options: training keys (epochs, lr, ...) go to `train`, the detector's own
        (k_small, epic_fraction, ...) to `options`. Another detector's option is accepted only at its default (the
        CLI passes every flag), else it is an error naming the detector it belongs to."""
        from sanitize.detectors import detector_options, list_detectors, option_names, options_class

        detector = options.get("detector", cls.detector)
        mine = {name: options.pop(name) for name in list(options) if name in option_names(detector)}
        own_fields = {f.name for f in dataclasses.fields(cls)}
        for other in list_detectors():
            defaults = dataclasses.asdict(options_class(other)())
            for name in [n for n in options if n in defaults and n not in own_fields]:
                if options[name] != defaults[name]:
                    raise SanitizeError(f"{name} is an option of the {other} detector, not of {detector}")
                del options[name]
        base = options.pop("options", None)
        options["options"] = (
            dataclasses.replace(base, **mine) if base is not None else detector_options(detector, **mine)
        )
        return route_options(cls, options, {"train": TrainConfig})

    def validate(self) -> None:
        """Reject values that cannot work, with a message naming the option."""
        from sanitize.detectors import list_detectors, options_class

        checks = [
            (self.detector in list_detectors(), f"detector must be one of {', '.join(list_detectors())}"),
            (self.index in ("auto", "flat", "ivf", "hnsw"), "index must be auto, flat, ivf or hnsw"),
            (self.precision in ("auto", "bf16", "fp32"), "precision must be auto, bf16 or fp32"),
            (0.0 <= self.max_flagged_fraction <= 1.0, "max_flagged_fraction must be in [0, 1]"),
            (self.train.epochs >= 0 and self.train.batch_size >= 1, "epochs must be >= 0 and batch_size >= 1"),
            *self.train.checks(),
            (self.image_size is None or self.image_size >= 8, "image_size must be >= 8"),
            (self.workers >= 0, "workers must be >= 0"),
            (self.validation in ("full", "header"), "validation must be full or header"),
            (self.decoded_cache in DECODED_CACHE_MODES, "decoded_cache must be auto, on or off"),
            (self.max_thumbnails >= 0, "max_thumbnails must be >= 0"),
            (self.proxy_folds == 0 or self.proxy_folds >= 2, "proxy_folds must be 0 (off) or >= 2"),
            (
                not (self.proxy_folds and self.checkpoint),
                "proxy_folds trains proxies on the data: not with --checkpoint (whose model is not trained here)",
            ),
            (self.checkpoint or not self.held_out_checkpoint, "held_out_checkpoint needs --checkpoint"),
        ]
        for ok, message in checks:
            if not ok:
                raise SanitizeError(message)
        if not isinstance(self.options, options_class(self.detector)):
            raise SanitizeError(
                f"options must be the {self.detector} detector's ({options_class(self.detector).__name__})"
            )
        if hasattr(self.options, "validate"):
            self.options.validate()

    def context(self, progress: bool) -> Any:
        """What the detector gets of this scan besides its options."""
        from sanitize.detectors import DetectorContext

        return DetectorContext(index=self.index, exact_max=self.exact_max, seed=self.seed, progress=progress)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
