import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from pyro_blora.features import N_FRAMES, log_mel_features


def test_frames_after_clip_are_zero_and_content_matches_extractor():
    fe = WhisperFeatureExtractor(feature_size=80)
    rng = np.random.default_rng(0)
    clip = (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32)
    feats = log_mel_features(fe, clip)
    assert feats.shape == (1, 80, N_FRAMES)
    assert (feats[0, :, 200:] == 0).all()
    assert feats[0, :, :200].abs().sum() > 0


def test_too_long_clip_is_refused_with_fix():
    fe = WhisperFeatureExtractor(feature_size=80)
    with pytest.raises(ValueError, match="at most 30 s"):
        log_mel_features(fe, np.zeros(16000 * 31, dtype=np.float32))


def test_stereo_is_refused():
    fe = WhisperFeatureExtractor(feature_size=80)
    with pytest.raises(ValueError, match="mono"):
        log_mel_features(fe, [np.zeros((2, 16000), dtype=np.float32)])
