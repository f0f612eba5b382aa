"""What the command modules share: option help that shows the config classes' defaults, the presets,
comma-separated values, your data's column names and the forgetting budget.

Defaults shown in ``--help`` are read from the config classes (``BLoRAConfig``, ``TrainConfig``,
``RetentionBudget``, ...), so that the command line never states a default the library does not use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
from rich.markup import escape

from pyro_blora.config import KL_NORMALIZATIONS, TARGET_PRESETS, BLoRAConfig, RetentionBudget, TrainConfig, target_patterns
from pyro_blora.data.columns import COLUMN_FLAGS

T = TypeVar("T")

# The first is what `train` runs unless told otherwise (RESULTS "A posterior that learns").
PRESETS = ("converged", "paper", "default")
PRESET_HELP = ("converged: the paper preset on all linear layers with the scales learning at 30x (BLoRAConfig.converged(), "
               "TrainConfig.converged()); paper: the paper's BLoRA as its authors' code runs it (BLoRAConfig.paper(), "
               "TrainConfig.paper(); README: the paper preset); default: the dataclasses' own defaults (the earlier "
               "per-entry KL); the options below override it")
TARGETS_HELP = f"adapted layers: {', '.join(TARGET_PRESETS)}, or a regular expression"

# Domains scored by default: the code-switched domain adapted to and the original one.
EVAL_DOMAINS = ["zh-en", "en"]

RETAIN_HELP = ("retention data (the domain to keep, e.g. testbed/en): with --retain-budget, a forgetting budget; "
               "utterances without transcripts are labelled by the base model's greedy transcripts")
BUDGET_HELP = ("how much worse the retention loss (CE per transcript token) may get: 0.03 = 3% over the base model; "
               "with --retain-absolute, the highest retention loss allowed (nats per token)")
RETAIN_SPLIT_HELP = "split of --retain (test when it has no such split)"
RETAIN_ABSOLUTE_HELP = "--retain-budget is the highest retention loss allowed"
RETAIN_PRECISION_HELP = ("precision of a retention measurement: fp32, or bf16 (about half the cost on CPUs with bf16 "
                         "units; the bound moves by up to about a point) [fp32]")

_NOT_GIVEN = object()


def shown(value: Any, none: str = "none") -> str:
    """A default as ``--help`` writes it: floats short (1e-3 as 0.001), tuples space-separated."""
    if value is None:
        return none
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return " ".join(shown(v, none) for v in value)
    return str(value)


def default_note(default: Any, other: Any = _NOT_GIVEN, none: str = "none", other_name: str = "paper") -> str:
    """``[default]``, or ``[default; paper: value]`` where another preset (``other_name``) differs, escaped
    so that the help renderer shows the brackets instead of reading them as markup."""
    text = shown(default, none)
    if other is not _NOT_GIVEN and other != default:
        text += f"; {other_name}: {shown(other, none)}"
    return escape(f"[{text}]")


def presets_note(values: dict[str, Any], none: str = "none") -> str:
    """``[value]`` when every preset agrees, else ``[converged, paper: a; default: b]``: each value with the
    presets that take it, in the order of ``PRESETS``; escaped for the help renderer."""
    shown_values = {name: shown(value, none) for name, value in values.items()}
    if len(set(shown_values.values())) == 1:
        return escape(f"[{next(iter(shown_values.values()))}]")
    groups: dict[str, list[str]] = {}
    for name, text in shown_values.items():
        groups.setdefault(text, []).append(name)
    return escape("[" + "; ".join(f"{', '.join(names)}: {text}" for text, names in groups.items()) + "]")


def _preset_values(cls, field: str) -> dict[str, Any]:
    return {name: getattr(cls() if name == "default" else getattr(cls, name)(), field) for name in PRESETS}


def adapter_default(field: str, none: str = "none") -> str:
    """A ``BLoRAConfig`` field's value under each preset."""
    return presets_note(_preset_values(BLoRAConfig, field), none)


def target_name(patterns: tuple[str, ...]) -> str:
    """The ``TARGET_PRESETS`` name of ``patterns``, or the patterns themselves."""
    return next((name for name, preset in TARGET_PRESETS.items() if preset == tuple(patterns)), " ".join(patterns))


def targets_default(default: tuple[str, ...] | None = None) -> str:
    """The adapted layers by preset name under each preset (``default`` replaces the default preset's)."""
    values = {name: target_name(patterns) for name, patterns in _preset_values(BLoRAConfig, "target_modules").items()}
    if default is not None:
        values["default"] = target_name(default)
    return presets_note(values)


def training_default(field: str) -> str:
    """A ``TrainConfig`` field's value under each preset."""
    return presets_note(_preset_values(TrainConfig, field))


def budget_default(field: str) -> str:
    """The default of a ``RetentionBudget`` field (its class attribute: the budget itself has none)."""
    return default_note(getattr(RetentionBudget, field))


# The adapter and prior options every training command takes (None: the preset's value).
RankOption = Annotated[Optional[int], typer.Option(help=adapter_default("rank"))]
AlphaOption = Annotated[Optional[float], typer.Option(help=adapter_default("alpha", none="2 * rank"))]
PriorScaleOption = Annotated[Optional[float], typer.Option(help=adapter_default("prior_scale"))]
BetaOption = Annotated[Optional[float], typer.Option(help=adapter_default("beta"))]
KLNormalizationOption = Annotated[Optional[str], typer.Option(
    help=f"{', '.join(KL_NORMALIZATIONS)} {adapter_default('kl_normalization')}")]


# The forgetting budget's options that train, evaluate and export share (None: RetentionBudget's default).
RetainOption = Annotated[Optional[Path], typer.Option(help=RETAIN_HELP)]
RetainSplitOption = Annotated[str, typer.Option(help=RETAIN_SPLIT_HELP)]
RetainAbsoluteOption = Annotated[bool, typer.Option(help=RETAIN_ABSOLUTE_HELP)]
RetainUtterancesOption = Annotated[Optional[int], typer.Option(
    help="retention utterances measured (a fixed set) " + budget_default("utterances"))]
RetainConfidenceOption = Annotated[Optional[float], typer.Option(
    help="confidence of the upper bound the budget holds " + budget_default("confidence"))]
RetainPrecisionOption = Annotated[Optional[str], typer.Option(help=RETAIN_PRECISION_HELP)]

# Your data's own column names (load_speech_dataset's columns=); None: the canonical name.
AudioColumnOption = Annotated[Optional[str], typer.Option(
    COLUMN_FLAGS["audio"], help="your data's column of audio file paths, e.g. file_name or path " + default_note("audio"))]
TextColumnOption = Annotated[Optional[str], typer.Option(
    COLUMN_FLAGS["text"], help="your data's column of transcripts, e.g. sentence " + default_note("text"))]
LanguageColumnOption = Annotated[Optional[str], typer.Option(
    COLUMN_FLAGS["language"], help="your data's column of language codes; rows without one are English "
    + default_note("language"))]


def column_mapping(audio: str | None, text: str | None, language: str | None) -> dict[str, str] | None:
    """The ``columns=`` mapping the column flags describe (None when none was given)."""
    given = {"audio": audio, "text": text, "language": language}
    return {canonical: yours for canonical, yours in given.items() if yours is not None} or None


def preset_configs(preset: str, adapter: dict, train: dict) -> tuple[BLoRAConfig, TrainConfig]:
    """The configs of ``preset`` (``default``: the dataclasses' defaults; ``paper``: BLoRAConfig.paper()
    and TrainConfig.paper()) with every option that was given (not None) put over them; ``targets``
    in ``adapter`` is a name of ``TARGET_PRESETS`` or a regular expression."""
    if preset not in PRESETS:
        raise typer.BadParameter(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    adapter = {k: v for k, v in adapter.items() if v is not None}
    train = {k: v for k, v in train.items() if v is not None}
    if "targets" in adapter:
        adapter["target_modules"] = target_patterns(adapter.pop("targets"))
    for name in ("init_scale_A", "init_scale_B"):  # "rho" on the command line: softplus(rho), rho ~ U(range)
        if adapter.get(name) == "rho":
            adapter[name] = None
        elif name in adapter:
            adapter[name] = float(adapter[name])
    if preset == "paper":
        return BLoRAConfig.paper(**adapter), TrainConfig.paper(**train)
    if preset == "converged":
        return BLoRAConfig.converged(**adapter), TrainConfig.converged(**train)
    return BLoRAConfig(**adapter), TrainConfig(**train)


def comma_values(text: str, convert: Callable[[str], T], option: str) -> tuple[T, ...]:
    """A comma-separated option value, e.g. ``0.1,0.5,1``."""
    try:
        values = tuple(convert(part.strip()) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise typer.BadParameter(f"{option} takes comma-separated values such as 0.1,0.5,1 ({error})") from error
    if not values:
        raise typer.BadParameter(f"{option} is empty; give at least one value")
    return values


def comma_list(values: tuple[Any, ...]) -> str:
    """The inverse of :func:`comma_values`: a default tuple as the option writes it."""
    return ",".join(shown(v) for v in values)


def retention_budget(budget: float | None, absolute: bool, retain: Path | None, **options) -> RetentionBudget | None:
    """The forgetting budget the command-line options describe (None without --retain-budget)."""
    if (budget is None) != (retain is None):
        raise typer.BadParameter("a forgetting budget needs both --retain (the retention data) and --retain-budget")
    if budget is None:
        return None
    given = {k: v for k, v in options.items() if v is not None}
    try:
        return RetentionBudget(budget, kind="absolute" if absolute else "relative", **given)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
