"""The report of a corpus build (``data_report.json``): what reading and cleaning counted, the split, the tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from datamodules.corpus import CorpusSettings, _SourceSet
    from datamodules.shards import ShardIndex


def sources_report(s: _SourceSet) -> dict[str, Any]:
    """What reading and cleaning one set of sources counted."""
    clean = s.cleaning
    return {
        "sources": {
            "paths": list(s.paths),
            "files": s.stats.files,
            "bytes": s.stats.bytes,
            "empty_files": s.stats.empty_files,
            "skipped_files": len(s.stats.skipped_files),
        },
        "documents": clean["documents"],
        "characters": clean["characters"],
        "rules": clean["rules"],
        "invalid_utf8_replacements": s.stats.invalid_utf8_replacements,
        "skipped_files": s.stats.skipped_files[:100],
    }


def build_report(
    settings: CorpusSettings,
    sets: list[_SourceSet],
    is_val: np.ndarray,
    val_in_train: int | None,
    tok_info: dict[str, Any],
    dtype: np.dtype,
    index: dict[str, ShardIndex],
    n_proc: int,
    text_bytes: int,
) -> dict[str, Any]:
    """The report of a build (the caller adds the cache key, the settings and the timings). The top-level counts
    are those of ``data.paths``; with ``data.val_paths``, ``"val"`` holds the same counts for those."""
    has_val_paths = len(sets) > 1
    report = sources_report(sets[0])
    if has_val_paths:
        report["val"] = sources_report(sets[1])
    report.update(
        {
            "split": {
                "train_documents": int((~is_val).sum()),
                "val_documents": int(is_val.sum()),
                "val_split": "data.val_paths"
                if has_val_paths
                else f"data.val_fraction={settings.val_fraction} (seed {settings.seed})",
                "val_fraction": None if has_val_paths else settings.val_fraction,
                "seed": settings.seed,
                # val documents that are also train documents (exact, after cleaning): dedup is per split
                "val_in_train": val_in_train,
            },
            "tokens": {split: sum(int(s["tokens"]) for s in shards) for split, shards in index.items()},
            "tokenizer": tok_info,
            "packing": {
                "dtype": dtype.name,
                "shards": {split: len(s) for split, s in index.items()},
                "encode_processes": n_proc,
                "text_bytes": text_bytes,
            },
        }
    )
    return report
