"""Structured-config schemas: the types, defaults and allowed values of every config key.

OmegaConf checks the types when Hydra composes the YAML tree onto these dataclasses; the
`choices` and range metadata below are checked by growrun.config.validate before a run starts.
Each group mirrors a code module:

    dataset/  -> growrun.data        model/  -> growrun.models     optim/ -> growrun.train.optim
    growth/   -> growrun.growth      trainer -> growrun.train.trainer   logger/ -> growrun.loggers
"""
from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any, Dict, List, Optional

from growrun.fields import bounded, choices
from growrun.growth.methods import BUILTIN




@dataclass
class DatasetConfig:
    name: str = choices("cifar10", "cifar10", "cifar100", "synthetic")
    # Where cifar-10-batches-py/ and cifar-100-python/ live. None: $GROWRUN_DATA, else
    # ~/.cache/growrun-data.
    root: Optional[str] = None
    download: bool = True  # download with torchvision when the files are missing
    verify: bool = True  # check the official md5 sums (turn off for local re-encoded copies)
    val_size: int = bounded(0, 0)  # training images held out (seeded) as a validation split
    train_subset: int = bounded(0, 0)  # use only this many training images (0: all), seeded
    test_subset: int = bounded(0, 0)  # use only this many test images (0: all), seeded
    augment: bool = True  # random crop (pad 4) and horizontal flip, on the device
    # synthetic only: class-conditional, learnable, CIFAR-shaped images
    num_classes: int = bounded(10, 2)
    train_size: int = bounded(1024, 1)
    test_size: int = bounded(256, 1)
    image_size: int = bounded(32, 4)
    noise: float = bounded(0.6, 0.0)  # pixel noise around each class template, in [0, 1] units


@dataclass
class ModelConfig:
    name: str = choices("resnet18", "mlp", "vgg", "resnet18")
    # Multiplier of the full architecture's widths for the layers that are not growth sites
    # (ResNet18's residual stream, the VGG stages' outer convs) and the growth targets' base.
    width: float = bounded(1.0, 0.0, lo_open=True)
    # Growth sites start at ceil(start_fraction * full site width); None: same as `width`.
    start_fraction: Optional[float] = bounded(None, 0.0)
    # Explicit starting width of every site, in model.site_names() order (overrides the above).
    site_widths: Optional[List[int]] = None
    # mlp: full hidden widths (each hidden layer is a growth site)
    hidden: List[int] = field(default_factory=lambda: [512, 512])
    # mlp / vgg: BatchNorm after every hidden layer
    batchnorm: bool = True


@dataclass
class OptimConfig:
    name: str = choices("sgd", "sgd", "adamw")
    lr: float = bounded(0.1, 0.0, lo_open=True)
    momentum: float = bounded(0.9, 0.0, 1.0, hi_open=True)  # sgd
    nesterov: bool = True  # sgd
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    weight_decay: float = bounded(5e-4, 0.0)
    decay_norm_and_bias: bool = False  # apply weight decay to BatchNorm and bias parameters too
    schedule: str = choices("cosine", "cosine", "step", "constant")
    warmup_epochs: float = bounded(0.0, 0.0)  # linear warm-up from 0, per step
    # the clock of the decay (cosine, step): optimizer steps, or the planned training FLOPs
    # (a growing run's cheap early steps move it less); train/optim.py, train/compute_plan.py
    schedule_over: str = choices("steps", "steps", "compute")
    min_lr_ratio: float = bounded(0.0, 0.0, 1.0)  # cosine floor, as a fraction of lr
    # re-warming after each planned growth event: the schedule's lr times (steps since the event
    # + 1) / R for R = rewarm_epochs x steps per epoch steps; 0 = off (train/optim.py)
    rewarm_epochs: float = bounded(0.0, 0.0)
    milestones: List[float] = field(default_factory=lambda: [0.5, 0.75])  # step: fractions of the run
    step_gamma: float = bounded(0.1, 0.0, 1.0, lo_open=True)


@dataclass
class LineSearchConfig:
    batch_size: int = bounded(512, 2)  # held-out training images the loss is measured on
    shrink: float = bounded(0.5, 0.0, 1.0, lo_open=True, hi_open=True)  # backtracking factor
    max_iter: int = bounded(12, 1)
    max_gamma: float = bounded(100.0, 0.0, lo_open=True)  # 10 capped TINY in 62 of 64 searches
    parabola: bool = False  # parabolic steps in gamma^2 (growrun/growth/linesearch.py); false: plain backtracking
    min_decrease: float = bounded(0.0, 0.0, 1.0, hi_open=True)  # a decrease counts when above this x L(0)


@dataclass
class _SharedGrowthConfig:
    """The options every method shares; GrowthConfig adds each method's own node (below)."""
    # none | a registered method (growrun/growth/methods/: tiny, tiny_noproj, gradmax, random, zero,
    # net2net, firefly, splitting) | module:Class, a GrowthMethod of your own; checked by validate
    method: str = "none"
    # when: every dt epochs (fractions allowed) from first_epoch until last_epoch (None: open)
    dt: float = bounded(1.0, 0.0, lo_open=True)
    first_epoch: float = bounded(1.0, 0.0)
    last_epoch: Optional[float] = bounded(None, 0.0)
    # trigger, checked at each of those events: schedule (always grow) | bottleneck (a site grows
    # only when its Psi / g2 >= when_threshold) | plateau (grow only when the validation loss,
    # else the training loss, improved by at most plateau_min_delta over the last
    # plateau_patience evaluations); growth/policy.py
    when: str = choices("schedule", "schedule", "bottleneck", "plateau")
    when_threshold: float = bounded(0.95, 0.0)  # bottleneck: Psi / g2 is in [0, 1]; > 1 never grows
    plateau_patience: int = bounded(2, 1)
    plateau_min_delta: float = bounded(0.01, 0.0)  # in loss units (cross-entropy, nats)
    # grow, then train this many more epochs: sets trainer.epochs from the planned growth
    # schedule (neurons=to_target only; None: trainer.epochs as given)
    extra_epochs: Optional[int] = bounded(None, 0)
    # where: every site at each step, one at a time in turn, or the one with the largest
    # expected gain per added parameter
    sites: str = choices("all", "all", "round_robin", "best_gain")
    only: Optional[List[str]] = None  # restrict growth to these site names
    # how many neurons per site and step: a fixed count, the count that reaches the target in
    # `steps` steps, or adaptive (neurons above the statistics' sampling noise, capped by count)
    neurons: str = choices("to_target", "fixed", "to_target", "adaptive")
    count: int = bounded(4, 1)
    steps: int = bounded(8, 1)
    # targets: site widths as a fraction of the full architecture, or explicit; optional budget
    target_fraction: float = bounded(1.0, 0.0, lo_open=True)
    target_widths: Optional[List[int]] = None
    param_budget: int = bounded(0, 0)  # stop growing past this many parameters (0: no budget)
    samples: int = bounded(1024, 2)  # n, training images the statistics are computed on
    # statistics from a separate pass over `samples` fresh images before each event, or
    # recorded on the last ceil(samples / batch_size) training steps before it (no extra pass)
    stats: str = choices("pass", "pass", "training")
    stats_batch_size: int = bounded(256, 2)  # BatchNorm in training mode needs 2 images per batch
    line_search: LineSearchConfig = field(default_factory=LineSearchConfig)
    apply_dw: bool = False  # also apply the best update dW2* of the existing L2 weights
    conv_fanout: str = choices("center", "center", "full")
    bn_init: str = choices("unit", "unit", "identity")  # new BN channels: weight 1 (fan-out rescaled) | identity
    # new neurons' scale at insertion (growth/scale.py): fan_in (fan-ins rebalanced to the mean
    # norm of the layer's existing fan-ins, fan-outs inversely: the same function) | none (as
    # solved and searched) | fan_out (fan-outs rebalanced to the existing fan-outs' mean norm:
    # the same function) | mean_norm (GradMax's: fan-ins at the existing mean norm, fan-outs at
    # gradmax_scale x theirs, instead of the searched amplitude: no line search)
    normalize: str = choices("fan_in", "fan_in", "none", "fan_out", "mean_norm")
    gradmax_scale: float = bounded(0.5, 0.0, lo_open=True)  # fan-out norm / mean existing norm (gradmax, mean_norm)
    noise_sigmas: float = bounded(2.0, 0.0)  # adaptive: keep lambda_k^2 above this many noise SDs
    rel_eps: float = bounded(1e-7, 0.0, 1.0, lo_open=True)  # relative eigenvalue threshold
    # where the float64 solves run: auto (CPU models: the CPU; CUDA: the faster of GPU and CPU at a
    # float64 matmul, timed once per process) | model (its device; MPS: CPU) | cpu; growth/solve_device.py
    solve_device: str = choices("auto", "auto", "model", "cpu")
    # growth.method=module:Class: that method's options (+growth.options.KEY=VALUE), checked against its
    # Options dataclass
    options: Dict[str, Any] = field(default_factory=dict)


# Each registered method with options has its node growth.<name> (e.g. growth.firefly.lr),
# the fields of its Options dataclass (growrun/growth/methods/<name>.py).
GrowthConfig = make_dataclass(
    "GrowthConfig", [(m.name, m.Options, field(default_factory=m.Options)) for m in BUILTIN if m.Options is not None],
    bases=(_SharedGrowthConfig,))
GrowthConfig.__module__ = __name__
GrowthConfig.__doc__ = "growth.*: the shared options and one node per method with options of its own."




@dataclass
class TrainerConfig:
    epochs: int = bounded(15, 0)
    batch_size: int = bounded(128, 1)
    eval_batch_size: int = bounded(1000, 1)
    label_smoothing: float = bounded(0.0, 0.0, 1.0, hi_open=True)
    precision: str = choices("fp32", "fp32", "bf16", help="bf16: autocast on CUDA only")
    progress: str = choices("auto", "auto", "on", "off", help="per-batch bars; auto: on a terminal")
    eval_every: int = bounded(1, 1)  # evaluate every this many epochs (and always at the end)
    threads: int = bounded(0, 0)  # torch intra-op threads (0: torch's default)
    # deterministic algorithms, cuDNN autotuner off: auto = on for CPU (exact resume, little cost),
    # off for CUDA (speed; a resumed run then differs in the last bits); true / false force it
    deterministic: Any = choices("auto", "auto", True, False)
    # TF32 for float32 matmuls and convolutions of training steps and evaluation (Ampere and later
    # GPUs); growth events (statistics, solves, line search) never use it; growrun/devices.py
    tf32: bool = False
    # NHWC memory format for convs: auto = on for CPU and CUDA (1.27-1.64x faster in training on
    # an AMD EPYC, bench/memory_format.json), off elsewhere (MPS); true / false force it
    channels_last: Any = choices("auto", "auto", True, False)
    checkpoint: bool = True  # write checkpoints/last.pt at the end of every epoch (and on SIGTERM/SIGINT)
    checkpoint_every: int = bounded(0, 0)  # also every this many optimizer steps (0: off)
    checkpoint_minutes: float = bounded(0.0, 0.0)  # also after this many minutes since the last one (0: off)
    # growth=none only: train for this many training FLOPs instead of `epochs` (the LR schedule spans
    # them; the last epoch may be partial): the fixed network at a grown run's compute; train/budget.py
    budget_flops: Optional[float] = bounded(None, 0.0, lo_open=True)
    # growth=none only: the budget of finished runs: a run directory (its compute, same seed) or a
    # sweep directory (the mean compute of its growing runs with this seed); train/budget.py
    budget_from: Optional[str] = None


@dataclass
class LoggerConfig:
    """logger.*: where a run is also logged, besides its CSV files (always written); growrun/loggers/.
    Several at once: logger=[tensorboard,mlflow]."""
    tensorboard: bool = False  # TensorBoard event files (logger=tensorboard)
    tensorboard_dir: Optional[str] = None  # None: <run dir>/tensorboard; else <this dir>/<run name>
    mlflow: bool = False  # an MLflow run (logger=mlflow)
    tracking_uri: Optional[str] = None  # mlflow: e.g. sqlite:///mlflow.db, http://host:5000 (None: MLflow's default)
    wandb: bool = False  # a Weights & Biases run (logger=wandb)
    mode: str = choices("online", "online", "offline", help="wandb: offline writes <run dir>/wandb for `wandb sync`")
    entity: Optional[str] = None  # wandb: the team or user (None: the logged-in account's default)
    project: str = "growrun"  # the mlflow experiment / the wandb project the run goes to
    name: Optional[str] = None  # the run's name under tensorboard_dir and in MLflow (None: the run directory's name)


@dataclass
class TrainConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = bounded(0, 0)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    resume: bool = False  # continue from <run dir>/checkpoints/last.pt when it exists
    # what a hyper-parameter search maximises or minimises (hparams_search=...): this summary.json
    # number of each trial is its objective (cli._task returns it to the sweeper; NaN when missing)
    optimized_metric: Optional[str] = choices(None, "final.val_acc", "final.val_loss", "final.test_acc",
                                              "final.test_loss", "final.train_acc", "final.train_loss", "best_test_acc")
