"""Refuse, before anything runs, a configuration in which growth could never add a neuron (or
whose starting model cannot be built).

`growrun train growth=tiny` with the default model (every site starting at its full width,
the default target) used to train and write an empty growth.csv. `check_growth` computes the
starting widths, targets, parameter count and growth schedule of a composed config (the model
is built on the meta device: no memory, no data) and raises a one-line GrowrunError naming the
keys to change (growrun.growth.policy.growth_blocker). growth=none grows nothing and is fine
with any widths. torch is imported only when a config is checked (not for `--help`).

    check_growth(cfg)                                   # precheck: data sizes from the config
    check_growth(cfg, data.num_classes, data.input_shape, steps_per_epoch)   # in a run: exact
"""
from __future__ import annotations

from omegaconf import DictConfig

from growrun.errors import GrowrunError


def check_growth(cfg: DictConfig, num_classes: int | None = None, input_shape: tuple | None = None,
                 steps_per_epoch: int | None = None) -> None:
    """Raise GrowrunError when cfg's starting model cannot be built (model.site_widths), or
    when no site of it can ever grow under cfg.growth.

    Without the data's num_classes and input_shape, they and steps_per_epoch are taken from the
    config (growrun.data.planned_shape); the schedule is then not checked when the training
    images do not fill one batch (an out-of-range split or batch size, reported when the run
    loads the data)."""
    from growrun.models import initial_arch

    if num_classes is None or input_shape is None:
        from growrun.data import planned_shape

        shape = planned_shape(cfg.dataset)
        num_classes, input_shape = shape.num_classes, shape.input_shape
        if steps_per_epoch is None:
            n, batch = shape.train_images, int(cfg.trainer.batch_size)
            steps_per_epoch = n // batch if n is not None and n >= batch else None  # else: the run says why
    arch = initial_arch(cfg.model, num_classes, tuple(input_shape))
    if cfg.growth.method == "none":
        return
    _check_start_fraction(cfg)
    blocker = _blocker(cfg, arch, steps_per_epoch)
    if blocker:
        raise GrowrunError(blocker)


def _check_start_fraction(cfg: DictConfig) -> None:
    """A start fraction above the target fraction: every site starts above its target."""
    m, g = cfg.model, cfg.growth
    if m.site_widths is None and g.target_widths is None and m.start_fraction is not None \
            and m.start_fraction > g.target_fraction:
        raise GrowrunError(f"model.start_fraction={m.start_fraction:g}: above growth.target_fraction="
                           f"{g.target_fraction:g}, so no site can grow (sites only grow); must be <= "
                           f"growth.target_fraction (or use growth=none)")


def _blocker(cfg: DictConfig, arch: dict, steps_per_epoch: int | None) -> str | None:
    """policy.growth_blocker on the starting model `arch` of cfg (steps_per_epoch None: unknown)."""
    import torch

    from growrun.growth import methods, policy
    from growrun.models import build_model, count_params, full_site_widths

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model(arch)
    sites = model.sites()
    start = {n: s.width for n, s in sites.items()}
    targets = policy.target_widths(cfg.growth, list(start), full_site_widths(arch, cfg.model), list(start.values()))
    per_neuron = {n: s.params_per_neuron() for n, s in sites.items()}
    epochs = _epochs(cfg, start, targets, steps_per_epoch)
    splits = methods.load(cfg.growth.method).splits
    return policy.growth_blocker(cfg.growth, epochs, steps_per_epoch, start, targets, count_params(model), per_neuron,
                                 splits)


def _epochs(cfg: DictConfig, start: dict, targets: dict, steps_per_epoch: int | None) -> int:
    """trainer.epochs as the run will use it (growth.extra_epochs: planned from the schedule)."""
    from growrun.growth import policy

    g = cfg.growth
    if g.extra_epochs is None or not steps_per_epoch:
        return int(cfg.trainer.epochs)
    return policy.planned_epochs(g, policy.planned_events(g, start, targets), steps_per_epoch)
