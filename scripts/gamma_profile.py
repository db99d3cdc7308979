#!/usr/bin/env python3
"""How far the first-order prediction of a growth step holds: the loss along the amplitude gamma.

From a run's checkpoint, draw statistics samples and a held batch as a growth event does,
propose neurons of growth.method at every site (the run's to_target count, or --count), and
measure the mean loss on the held batch with the candidate neurons attached at a range of
gamma, against the prediction of tiny_math.md section 5:  L(gamma) - L(0) = p gamma^2,
p = s0 sum_k alpha_k^T M1 omega_k. The ratio measured / predicted is ~1 where the
linearisation holds and falls below 1 beyond it.

It also splits the prediction's error: with g the gradient of the held batch's loss w.r.t.
L2's output and D(a) the change of that output when the neurons (fan-in a) are attached,
<g, D(alpha)> is the first-order gain with the true ReLU and <g, D(alpha) - D(-alpha)> the
gain with the activation linearised (relu(z) - relu(-z) = z), which is what p predicts.

    python scripts/gamma_profile.py outputs/runs/<run> [--samples 1024] [--out bench/gamma_profile.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from growrun.data.loader import BatchLoader
from growrun.growth import methods, policy
from growrun.growth.draws import draw_samples
from growrun.models.site import Neurons, frozen_bn_stats
from growrun.growth.stats import collect_statistics
from growrun.growth.surgery import candidate, new_channel_moments
from growrun.models import count_params, full_site_widths

from run_loading import load_run

GAMMAS = [2.0 ** e for e in range(-4, 5)]  # x the gamma whose predicted gain is 1% of L(0)


def first_order_split(model, site, neurons, mean, var, x, y, gamma: float) -> tuple[float, float]:
    """(<g, D(alpha)>, <g, D(alpha) - D(-alpha)>) / gamma^2 as mean-loss decreases."""
    outs = {}

    def capture(_m, _i, out):
        outs["out"] = out

    flipped = Neurons(-neurons.w1, None if neurons.b1 is None else -neurons.b1, neurons.w2)
    deltas = []
    for nrn, mu in ((neurons, mean), (flipped, None if mean is None else -mean)):
        with candidate(site, nrn, mu, var) as cand:
            hook = site.l2.register_forward_hook(capture)
            try:
                with torch.no_grad():
                    cand.gamma = gamma
                    model(x)
                    on = outs["out"]
                    cand.gamma = 0.0
                    model(x)
                    deltas.append((on - outs["out"]) / gamma ** 2)
            finally:
                hook.remove()
    with torch.enable_grad():
        hook = site.l2.register_forward_hook(capture)
        try:
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            grad, = torch.autograd.grad(loss, outs["out"])
        finally:
            hook.remove()
    return -float((grad * deltas[0]).sum()), -float((grad * (deltas[0] - deltas[1])).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--samples", type=int, default=1024, help="statistics samples")
    p.add_argument("--held", type=int, default=512, help="held batch the loss is measured on")
    p.add_argument("--count", type=int, default=0, help="neurons per site (0: the run's to_target count)")
    p.add_argument("--method", default=None, help="growth method (default: the run's)")
    p.add_argument("--rel-eps", type=float, default=None, help="relative eigenvalue threshold (default: the run's)")
    p.add_argument("--out", type=Path, default=Path("bench/gamma_profile.json"))
    args = p.parse_args()
    ckpt, cfg, data, model = load_run(args.run_dir)
    if args.rel_eps is not None:
        cfg.growth.rel_eps = args.rel_eps
    g, method = cfg.growth, args.method or cfg.growth.method
    grower = methods.create(OmegaConf.merge(g, {"method": method}))  # methods measuring on batches: not here
    norm = BatchLoader(data.train, 1, mean=data.mean, std=data.std, shuffle=False, augment=False,
                       drop_last=False, seed=0)
    gen = torch.Generator().manual_seed(12345)
    stats_batches, (held_x, held_y) = draw_samples(data.train, norm.normalize, args.samples, args.held, 256, gen,
                                                   torch.channels_last)
    sites = model.sites()
    start = (ckpt["trainer"].get("growth") or {}).get("start", {})
    targets = policy.target_widths(g, list(sites), full_site_widths(ckpt["arch"], cfg.model),
                                   [s.width for s in sites.values()])
    stats = collect_statistics(model, list(sites.values()), stats_batches,
                               lambda o, y: F.cross_entropy(o, y, reduction="sum"), conv_fanout=g.conv_fanout)
    rows, split = [], []
    with torch.no_grad(), frozen_bn_stats(model):
        base = float(F.cross_entropy(model(held_x), held_y))
        for name, site in sites.items():
            k = args.count or max(1, policy.neuron_count(g, site.width, start.get(name, site.width), targets[name],
                                                         count_params(model), site.params_per_neuron()))
            prop = grower.propose(site, stats[name], k, methods.EventContext(generator=gen))
            if prop.neurons.count == 0 or not prop.first_order < 0:
                continue
            mean, var = new_channel_moments(model, site, prop.neurons, [x for x, _ in stats_batches]) \
                if site.bn is not None else (None, None)
            g_lin = (0.01 * base / -prop.first_order) ** 0.5
            relu_gain, linear_gain = first_order_split(model, site, prop.neurons, mean, var, held_x, held_y,
                                                       g_lin / 16)
            split.append({"site": name, "predicted_per_gamma2": -prop.first_order,
                          "linearised_relu_on_held": linear_gain, "true_relu_on_held": relu_gain})
            with candidate(site, prop.neurons, mean, var) as cand:
                for mult in GAMMAS:
                    cand.gamma = gamma = mult * g_lin
                    measured = base - float(F.cross_entropy(model(held_x), held_y))
                    predicted = -prop.first_order * gamma ** 2
                    rows.append({"site": name, "neurons": prop.neurons.count, "gamma": gamma, "gamma_over_lin": mult,
                                 "predicted_gain": predicted, "measured_gain": measured,
                                 "ratio": measured / predicted})
    for r in rows:
        print(f"{r['site']:9} K={r['neurons']:3d}  gamma {r['gamma']:8.3f} (x{r['gamma_over_lin']:6.3f})  "
              f"predicted {r['predicted_gain']:.2e}  measured {r['measured_gain']:+.2e}  ratio {r['ratio']:.2f}")
    for r in split:
        print(f"{r['site']:9} gain per gamma^2: predicted {r['predicted_per_gamma2']:.3e}  linearised ReLU on the "
              f"held batch {r['linearised_relu_on_held']:.3e}  true ReLU {r['true_relu_on_held']:.3e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run_dir": str(args.run_dir), "epoch": ckpt["trainer"].get("epoch"),
                                    "method": method, "loss_before": base, "rows": rows,
                                    "first_order_split": split}, indent=1) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
