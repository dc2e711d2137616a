"""Free disk on an agent's host: in its models folder (pushed files) and its Hugging Face cache
(files it fetches from the Hub), as facts the planner checks each node's share against."""

from __future__ import annotations

import shutil
from pathlib import Path

from huggingface_hub import constants


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system that holds folder (or its nearest existing parent)."""
    folder = Path(folder).resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def hf_cache() -> Path:
    """Where huggingface_hub keeps downloads on this host (HF_HUB_CACHE, HF_HOME, or default)."""
    return Path(constants.HF_HUB_CACHE)


def disk_facts(models_dir: Path) -> dict[str, int]:
    return {"disk_free": free_bytes(models_dir), "hf_cache_free": free_bytes(hf_cache())}
