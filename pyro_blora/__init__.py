"""pyro-blora: Bayesian low-rank adaptation of Whisper with Pyro."""

from pyro_blora.model.adapters import BayesianLoRALinear, lora_delta_weight
from pyro_blora.training.budget import RetentionSet
from pyro_blora.config import BLoRAConfig, RetentionBudget, TrainConfig
from pyro_blora.data import DataReport, load_audio, load_speech_dataset, make_dataloader, prepare_dataset
from pyro_blora.training.distributed import DistributedContext, distributed_session, init_distributed
from pyro_blora.model.encoder_window import set_encoder_window
from pyro_blora.evaluation.scoring import EvalOptions, evaluate_whisper, load_eval_sets
from pyro_blora.experiments.main_job import MainJobConfig, run_main_job
from pyro_blora.experiments.step import run_evaluation
from pyro_blora.features import log_mel_features
from pyro_blora.model.guide import BLoRAGuide, BLoRAMAPGuide, build_guide
from pyro_blora.predict.monte_carlo import (
    MonteCarloTranscript,
    PointTranscript,
    minimum_bayes_risk,
    monte_carlo_transcribe,
    point_transcribe,
    posterior_mean_model,
    sample_posterior,
)
from pyro_blora.metrics import (
    ErrorCounts,
    SparsityStats,
    cer,
    energy_curve,
    error_rate,
    hoyer_index,
    mixed_error_rate,
    normalize_text,
    sparsity_report,
    utterance_error_rates,
    wer,
)
from pyro_blora.data.training_data import load_training_data
from pyro_blora.runs import METHODS, base_model_of, load_run_model
from pyro_blora.runs import finished as run_finished
from pyro_blora.training.methods import run_training
from pyro_blora.model.whisper import BLoRAWhisper, wrap_whisper
from pyro_blora.model.objective import ElboScaling, analytic_kl, elbo_scaling, elbo_terms, token_nll
from pyro_blora.interop.peft import blora_config_from_peft, export_peft, import_peft
from pyro_blora.posterior import load_posterior, save_posterior
from pyro_blora.model.recompute import gradient_checkpointing
from pyro_blora.posterior import export_posterior_tensors, read_posterior_tensors
from pyro_blora.experiments.sequence import STRATEGIES, SequenceConfig, run_sequence
from pyro_blora.experiments.sequence_results import SequenceResult
from pyro_blora.metrics.continual import backward_transfer, forgetting, sequence_metrics
from pyro_blora.predict.transcribe import TranscribeOptions, transcribe
from pyro_blora.predict.transcripts import UtteranceTranscript, WordConfidence, word_confidences
from pyro_blora.evaluation.uncertainty import UncertaintyReport, evaluate_uncertainty
from pyro_blora.training.loop import NonFiniteLossError, TrainingInterrupted, TrainResult
from pyro_blora.training.svi import PosteriorCollapseWarning, train
from pyro_blora.data.labels import EnglishOnlyModelError, check_language
from pyro_blora.offline import HubUnavailableError
from pyro_blora.base_models.loading import export_ctranslate2, load_processor, load_whisper

__all__ = [
    "DistributedContext",
    "distributed_session",
    "gradient_checkpointing",
    "init_distributed",
    "set_encoder_window",
    "BLoRAConfig",
    "BLoRAGuide",
    "BLoRAMAPGuide",
    "BLoRAWhisper",
    "BayesianLoRALinear",
    "DataReport",
    "ElboScaling",
    "EnglishOnlyModelError",
    "ErrorCounts",
    "EvalOptions",
    "HubUnavailableError",
    "METHODS",
    "MainJobConfig",
    "MonteCarloTranscript",
    "NonFiniteLossError",
    "PointTranscript",
    "PosteriorCollapseWarning",
    "RetentionBudget",
    "RetentionSet",
    "STRATEGIES",
    "SequenceConfig",
    "SequenceResult",
    "SparsityStats",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "TranscribeOptions",
    "UncertaintyReport",
    "UtteranceTranscript",
    "WordConfidence",
    "analytic_kl",
    "backward_transfer",
    "base_model_of",
    "blora_config_from_peft",
    "build_guide",
    "cer",
    "check_language",
    "elbo_scaling",
    "elbo_terms",
    "energy_curve",
    "error_rate",
    "evaluate_uncertainty",
    "evaluate_whisper",
    "export_ctranslate2",
    "export_peft",
    "export_posterior_tensors",
    "forgetting",
    "hoyer_index",
    "import_peft",
    "load_audio",
    "load_eval_sets",
    "load_posterior",
    "load_processor",
    "load_run_model",
    "load_speech_dataset",
    "load_training_data",
    "load_whisper",
    "log_mel_features",
    "lora_delta_weight",
    "make_dataloader",
    "minimum_bayes_risk",
    "mixed_error_rate",
    "monte_carlo_transcribe",
    "normalize_text",
    "point_transcribe",
    "posterior_mean_model",
    "prepare_dataset",
    "read_posterior_tensors",
    "run_evaluation",
    "run_finished",
    "run_main_job",
    "run_sequence",
    "run_training",
    "sample_posterior",
    "save_posterior",
    "sequence_metrics",
    "sparsity_report",
    "token_nll",
    "train",
    "transcribe",
    "utterance_error_rates",
    "wer",
    "word_confidences",
    "wrap_whisper",
]
__version__ = "0.1.0"
