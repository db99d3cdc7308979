"""What growth.stats=training costs: TINY's neurons from statistics recorded on training steps
against those of a separate pass, on a run's checkpoint.

From the checkpoint (model, optimizer state, learning rate), four sets of statistics of every
site, all describing the model W_end the event would grow:
  training  recorded on the next k = ceil(samples / batch) training batches (augmented as in
            the run) while the optimizer takes its k real steps (at the run's learning rate
            times --lr-scale), which end at W_end;
  frozen    the same k batches at W_end, weights fixed (no optimizer step);
  pass      a separate pass over `samples` fresh unaugmented images at W_end;
  pass2     another, independent draw (the sampling noise of the pass itself).
Each site's TINY proposal (the run's to_target count) is then line-searched on one held batch of
unaugmented images, every site from the same model W_end; printed: the loss decrease reached
per site and in sum. training vs frozen isolates the weights moving during the window, frozen
vs pass the augmented batches, pass vs pass2 the sampling noise.

    python scripts/stats_window_check.py RUN_DIR [--samples N] [--held 512] [--out bench/stats_window.json]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from growrun.data.loader import BatchLoader
from growrun.growth import methods, policy
from growrun.growth.draws import draw_samples
from growrun.growth.linesearch import line_search
from growrun.models.site import frozen_bn_stats
from growrun.growth.stats import collect_statistics
from growrun.growth.stats_training import TrainingStats
from growrun.growth.surgery import new_channel_moments
from growrun.models import count_params, full_site_widths
from growrun.train.optim import build_optimizer

from run_loading import load_run


def record(model, opt, batches, smoothing: float, step: bool) -> dict:
    """Statistics of all sites from training steps on `batches` (optimizer steps if `step`)."""
    sites = list(model.sites().values())
    rec = TrainingStats(sites)
    for x, y in batches:
        rec.attach()
        loss = F.cross_entropy(model(x), y, label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step:
            opt.step()
    opt.zero_grad(set_to_none=True)
    return rec.finish()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--samples", type=int, default=0, help="statistics samples (default: the run's growth.samples)")
    p.add_argument("--held", type=int, default=512, help="held batch the line search measures the loss on")
    p.add_argument("--lr-scale", type=float, default=1.0, help="scale the run's learning rate for the window's steps")
    p.add_argument("--out", type=Path, default=Path("bench/stats_window.json"))
    args = p.parse_args()
    ckpt, cfg, data, model = load_run(args.run_dir)
    g, t = cfg.growth, cfg.trainer
    tiny = methods.create(OmegaConf.merge(g, {"method": "tiny"}))
    samples = args.samples or g.samples
    opt = build_optimizer(model, cfg.optim)
    opt.load_state_dict(ckpt["trainer"]["optimizer"])
    for group in opt.param_groups:
        group["lr"] *= args.lr_scale
    lr = opt.param_groups[0]["lr"]
    loader = BatchLoader(data.train, t.batch_size, mean=data.mean, std=data.std, shuffle=True,
                         augment=cfg.dataset.augment, drop_last=True, seed=cfg.seed)
    k = math.ceil(samples / t.batch_size)
    window = [(x.contiguous(memory_format=torch.channels_last), y)
              for _, (x, y) in zip(range(k), loader.epoch(ckpt["trainer"]["epoch"]))]
    stats = {"training": record(model, opt, window, t.label_smoothing, step=True)}  # ends at W_end
    with frozen_bn_stats(model):
        stats["frozen"] = record(model, opt, window, t.label_smoothing, step=False)
    loss_sum = lambda o, y: F.cross_entropy(o.float(), y, reduction="sum", label_smoothing=t.label_smoothing)  # noqa: E731
    draws = []
    for seed in (1, 2, 3):
        draw, held = draw_samples(data.train, loader.normalize, samples if seed < 3 else 0, args.held, 256,
                                  torch.Generator().manual_seed(seed), torch.channels_last)
        draws.append(draw if seed < 3 else held)
    sites = model.sites()
    for name, draw in (("pass", draws[0]), ("pass2", draws[1])):
        stats[name] = collect_statistics(model, list(sites.values()), draw, loss_sum)
    held_x, held_y = draws[2]
    mean_loss = lambda o, y: F.cross_entropy(o.float(), y, label_smoothing=t.label_smoothing)  # noqa: E731
    start = (ckpt["trainer"].get("growth") or {}).get("start", {})
    targets = policy.target_widths(g, list(sites), full_site_widths(ckpt["arch"], cfg.model),
                                   [s.width for s in sites.values()])
    result = {"run_dir": str(args.run_dir), "epoch": ckpt["trainer"]["epoch"], "lr": lr, "window_batches": k,
              "samples": samples, "sites": {}}
    for name, site in sites.items():
        count = max(1, policy.neuron_count(g, site.width, start.get(name, site.width), targets[name],
                                           count_params(model), site.params_per_neuron()))
        row = result["sites"][name] = {"count": count}
        for variant, st in stats.items():
            prop = tiny.propose(site, st[name], count, methods.EventContext())
            moments = new_channel_moments(model, site, prop.neurons, [held_x]) \
                if site.bn is not None and prop.count else None
            found = line_search(model, site, prop.neurons, moments, prop.first_order, (held_x, held_y), mean_loss,
                                g.line_search, bn_init=g.bn_init)
            row[variant] = found.loss_before - found.loss_at_gamma
        print(f"{name:9} K={count:3d}  " + "  ".join(f"{v} {row[v]:+.2e}" for v in stats))
    total = {v: sum(r[v] for r in result["sites"].values()) for v in stats}
    result["total_gain"] = total
    print(f"epoch {result['epoch']}, lr {lr:.4g}, window {k} batches; summed loss decrease: "
          + "  ".join(f"{v} {x:.2e}" for v, x in total.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
