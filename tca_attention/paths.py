"""Where tca-attention keeps what it builds once (dequantised models, calibration state)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$TCA_CACHE_DIR, or ~/.cache/tca_attention."""
    return Path(os.environ.get("TCA_CACHE_DIR", Path.home() / ".cache" / "tca_attention"))
