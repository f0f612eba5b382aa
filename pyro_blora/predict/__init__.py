"""Prediction with a trained posterior: the posterior-mean model, Monte Carlo transcription with
uncertainty, word confidence, long-form decoding, and transcript files (JSONL, SRT, VTT)."""
