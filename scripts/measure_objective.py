#!/usr/bin/env python
"""Two measurements behind the objective's defaults, on a small random Whisper (seconds on a CPU).

1. Estimators: the spread of the KL term and of its gradient over repeated draws, for Trace_ELBO
   (Monte Carlo KL), Pyro's TraceMeanField_ELBO (with AutoNormal the latent site is a Delta, so it
   gives the same estimate) and the closed-form Gaussian KL ("analytic").
2. Scale movement: how far the posterior standard deviations move in a short run under each scale
   parameterisation and scale learning rate.

  python scripts/measure_objective.py [--draws 50] [--steps 40] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

import pyro_blora as pb
from pyro_blora.report.tables import markdown_table
from pyro_blora.base_models.tiny import TinyTask, collate, tiny_whisper

TARGETS = (r".*_proj$", r".*fc\d$", r"proj_out")


def _setup(config: pb.BLoRAConfig, task: TinyTask):
    model = pb.wrap_whisper(tiny_whisper(0), config)
    guide = pb.build_guide(model, seed=0)
    model.configure_objective(pb.elbo_scaling(config, len(task), 40, model.num_adapter_parameters()))
    return model, guide


def estimator_spread(draws: int) -> list[dict]:
    task = TinyTask(8)
    model, guide = _setup(pb.BLoRAConfig(rank=4, target_modules=TARGETS), task)
    guide.set_stddevs(1e-3)
    batch = collate([task[i] for i in range(4)])
    batch["index"] = torch.arange(4)
    first = next(p for n, p in guide.named_parameters() if n.startswith("scales."))
    rows = []
    for name in ("trace", "meanfield (Pyro)", "analytic"):
        values, grads = [], []
        for draw in range(draws):
            pyro.set_rng_seed(draw)
            if name == "meanfield (Pyro)":
                loss = kl = TraceMeanField_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, batch)
            else:
                terms = pb.elbo_terms(model, guide, batch, estimator=name)
                loss, kl = terms.loss, terms.kl
            grad = torch.autograd.grad(loss, first)[0]
            values.append(float(kl.detach()))
            grads.append(grad.flatten())
        values_t = torch.tensor(values)
        grads_t = torch.stack(grads)
        rows.append(
            {
                "estimator": name,
                "term": "KL" if name != "meanfield (Pyro)" else "whole loss",
                "mean": float(values_t.mean()),
                "std over draws": float(values_t.std()),
                "mean std of a scale gradient": float(grads_t.std(0).mean()),
            }
        )
    # Trace_ELBO as a whole loss, to compare with Pyro's mean-field estimate on equal terms.
    losses = []
    for draw in range(draws):
        pyro.set_rng_seed(draw)
        losses.append(float(Trace_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, batch)))
    rows.append({"estimator": "trace (Pyro)", "term": "whole loss", "mean": float(torch.tensor(losses).mean()),
                 "std over draws": float(torch.tensor(losses).std()), "mean std of a scale gradient": float("nan")})
    return rows


def scale_movement(steps: int) -> list[dict]:
    task = TinyTask(8)
    rows = []
    for parameterization, multiplier in (("softplus", 1.0), ("exp", 1.0), ("exp", 10.0)):
        config = pb.BLoRAConfig(rank=4, target_modules=TARGETS, scale_parameterization=parameterization)
        model, guide = _setup(config, task)
        before = torch.cat([v.flatten() for v in guide.stddevs().values()])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pb.train(model, guide, task, collate, pb.TrainConfig(steps=steps, lr=1e-3, scale_lr_multiplier=multiplier,
                                                                 progress=False, checkpoint_every=0))
        after = torch.cat([v.flatten() for v in guide.stddevs().values()])
        ratio = after / before
        rows.append({"parameterisation": parameterization, "scale lr": f"{multiplier:g} x lr",
                     "median sigma after/before": float(ratio.median()), "max": float(ratio.max())})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    text = f"### Estimators ({args.draws} draws)\n\n{markdown_table(estimator_spread(args.draws))}\n\n"
    text += f"### Scale movement ({args.steps} steps, lr 1e-3)\n\n{markdown_table(scale_movement(args.steps))}\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
