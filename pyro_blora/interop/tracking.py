"""Experiment tracking: TensorBoard or MLflow, fed by the training loop's callbacks.

A tracker is a callback of :func:`pyro_blora.training.svi.train` (``callbacks=[tracker]``). Every step
it logs the record's scalars (``train/loss`` is the scaled negative ELBO, ``train/nll``,
``train/kl``, ``train/grad_norm``, ``train/lr``, ``eval/nll`` when evaluated); every ``every``
steps (and at step 1) also the closed-form KL of the posterior from the prior in nats (``kl/total`` and
``kl_layer/<module path>``, A and B of a layer together) and the sparsity statistics of the
posterior means (``sparsity/{all,A,B}/<statistic>``). ``log_metrics`` logs anything else (e.g.
evaluation error rates) and the run config is logged as parameters when the tracker is made::

    with make_tracker("tensorboard", run_dir, {"blora": blora.to_dict(), "train": cfg.to_dict()}) as tracker:
        train(model, guide, data, collate, cfg, callbacks=[tracker])
        tracker.log_metrics({"eval/wer": 0.21}, step=cfg.steps)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from pyro_blora.model.guide import BLoRAGuide
from pyro_blora.metrics import sparsity_report
from pyro_blora.model.whisper import BLoRAWhisper
from pyro_blora.model.objective import analytic_kl
from pyro_blora.model.whisper import module_path

__all__ = ["TRACKERS", "MlflowTracker", "NullTracker", "TensorBoardTracker", "Tracker", "flatten_params", "make_tracker"]

TRACKERS = ("tensorboard", "mlflow", "none")
TrackerKind = Literal["tensorboard", "mlflow", "none"]
_RECORD_SCALARS = {"loss": "train/loss", "nll": "train/nll", "kl": "train/kl", "grad_norm": "train/grad_norm", "lr": "train/lr", "eval_nll": "eval/nll"}
_SPARSITY_STATS = ("thresh_fraction", "adaptive_thresh_fraction", "top_energy_share", "hoyer_index")


def flatten_params(config: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str | int | float | bool]:
    """``{"blora": {"rank": 4}}`` -> ``{"blora.rank": 4}``; objects with ``to_dict`` are expanded,
    values other than numbers, strings and booleans (lists, None) are written as JSON."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    flat: dict[str, str | int | float | bool] = {}
    for key, value in dict(config).items():
        name = f"{prefix}{key}"
        if hasattr(value, "to_dict") or isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value, default=str)
    return flat


def posterior_statistics(model: BLoRAWhisper, guide: BLoRAGuide, sparsity_threshold: float, per_layer: bool) -> dict[str, float]:
    """Closed-form KL (nats, unscaled) in total and per layer, and sparsity of the posterior means."""
    scalars: dict[str, float] = {}
    with torch.no_grad():
        kl = analytic_kl(model, guide)
        scalars["kl/total"] = float(sum(kl.values()))
        if per_layer:
            for site, value in kl.items():
                key = f"kl_layer/{module_path(site)[0]}"
                scalars[key] = scalars.get(key, 0.0) + float(value)
        means = guide.means()
        pools = {"all": list(means.values())}
        for which in ("A", "B"):
            pools[which] = [value for site, value in means.items() if site.endswith(f"lora_{which}")]
        for pool, values in pools.items():
            stats = sparsity_report(values, threshold=sparsity_threshold).as_dict()
            scalars.update({f"sparsity/{pool}/{name}": float(stats[name]) for name in _SPARSITY_STATS})
    return scalars


class Tracker:
    """Base tracker: turns step records into scalars; subclasses say where scalars go."""

    def __init__(self, every: int = 10, per_layer_kl: bool = True, sparsity_threshold: float = 1e-3) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1 (log the KL and sparsity every that many steps), got {every}")
        self.every = every
        self.per_layer_kl = per_layer_kl
        self.sparsity_threshold = sparsity_threshold

    def __call__(self, record: Mapping[str, Any], model: BLoRAWhisper, guide: BLoRAGuide) -> None:
        step = int(record["step"])
        scalars = {name: float(record[key]) for key, name in _RECORD_SCALARS.items() if key in record}
        if step % self.every == 0 or step == 1:
            scalars.update(posterior_statistics(model, guide, self.sparsity_threshold, self.per_layer_kl))
        self.log_metrics(scalars, step)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalars (e.g. ``{"eval/wer": 0.2}``) at ``step``."""
        self._write_scalars({key: float(value) for key, value in metrics.items()}, int(step))

    def log_params(self, config: Mapping[str, Any] | Any) -> None:
        """Log a (nested) run config as flat ``section.field`` parameters."""
        self._write_params(flatten_params(config))

    def close(self, failed: bool = False) -> None:
        pass

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def _write_scalars(self, scalars: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _write_params(self, params: dict[str, str | int | float | bool]) -> None:
        raise NotImplementedError


class NullTracker(Tracker):
    """Logs nothing (``--tracker none``) and computes nothing."""

    def __call__(self, record, model, guide) -> None:
        return None

    def _write_scalars(self, scalars, step) -> None:
        return None

    def _write_params(self, params) -> None:
        return None


class TensorBoardTracker(Tracker):
    """Event files in ``log_dir``; the config goes in as hyperparameters and as a JSON text."""

    def __init__(self, log_dir: str | Path, **options: Any) -> None:
        super().__init__(**options)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError("the TensorBoard tracker needs tensorboard: pip install tensorboard") from error
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def _write_scalars(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)

    def _write_params(self, params: dict[str, str | int | float | bool]) -> None:
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(params, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```json\n" + json.dumps(params, indent=1, sort_keys=True) + "\n```")

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    """One MLflow run; by default in a SQLite store inside the run folder (no server needed)."""

    MAX_PARAM_LENGTH = 6000
    BATCH = 100

    def __init__(
        self,
        tracking_uri: str,
        experiment: str = "pyro-blora",
        run_name: str | None = None,
        artifact_location: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as error:
            raise ImportError("the MLflow tracker needs mlflow: pip install mlflow-skinny sqlalchemy alembic (or mlflow)") from error
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment, artifact_location=artifact_location)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.tracking_uri = tracking_uri

    def _write_scalars(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value in scalars.items() if not math.isinf(value)]
        for start in range(0, len(metrics), self.BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + self.BATCH])

    def _write_params(self, params: dict[str, str | int | float | bool]) -> None:
        from mlflow.entities import Param

        entries = [Param(key, str(value)[: self.MAX_PARAM_LENGTH]) for key, value in params.items()]
        for start in range(0, len(entries), self.BATCH):
            self.client.log_batch(self.run_id, params=entries[start:start + self.BATCH])

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def make_tracker(
    kind: TrackerKind,
    run_dir: str | Path,
    config: Mapping[str, Any] | Any | None = None,
    *,
    tracking_uri: str | None = None,
    experiment: str = "pyro-blora",
    every: int = 10,
    per_layer_kl: bool = True,
) -> Tracker:
    """The tracker for ``--tracker kind``, writing under ``run_dir``, with ``config`` logged as parameters.

    TensorBoard writes to ``run_dir/tensorboard``; MLflow to ``tracking_uri`` or, by default, the
    SQLite store ``run_dir/mlflow.db`` with artifacts in ``run_dir/mlflow-artifacts``.
    """
    if kind not in TRACKERS:
        raise ValueError(f"unknown tracker {kind!r}; choose one of {', '.join(TRACKERS)}")
    run_dir = Path(run_dir)
    options = dict(every=every, per_layer_kl=per_layer_kl)
    if kind == "none":
        return NullTracker(**options)
    run_dir.mkdir(parents=True, exist_ok=True)
    if kind == "tensorboard":
        tracker: Tracker = TensorBoardTracker(run_dir / "tensorboard", **options)
    else:
        uri = tracking_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        artifacts = None if tracking_uri else str((run_dir / "mlflow-artifacts").resolve())
        tracker = MlflowTracker(uri, experiment=experiment, run_name=run_dir.name, artifact_location=artifacts, **options)
    if config is not None:
        tracker.log_params(config)
    return tracker
