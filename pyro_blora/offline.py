"""Whether the Hugging Face Hub can be reached, and the one error for when it cannot.

Model loading (:mod:`pyro_blora.base_models`) and dataset loading (:mod:`pyro_blora.data`) both fall
back to local material offline; they share this error so a caller catches one type.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

__all__ = ["HUB_PROBE_TIMEOUT_S", "HubUnavailableError", "hub_reachable", "offline_mode"]

HUB_PROBE_TIMEOUT_S = 3.0


class HubUnavailableError(OSError):
    """The Hugging Face hub cannot be reached (offline) and the model or data set is not cached locally."""


def offline_mode() -> bool:
    return any(
        os.environ.get(flag, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_reachable() -> bool:
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False
