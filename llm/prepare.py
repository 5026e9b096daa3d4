"""`python -m llm.prepare [the overrides of train.py]`: run the data pipeline (sources -> cleaning -> tokenizer ->
packing) into the cache and print what it did; no model, no training. A corpus can be prepared on a CPU machine
and trained on elsewhere: `train.py` with the same overrides (and the same `data.cache_dir`, which may be shared)
finds the same cache entries, keyed by the input files' content and the settings, and builds nothing.

The config is composed from the same conf/ as train.py and the DataModule built as train.py builds it, so the
entry is the one training will look for. A mistake in the overrides or the data is one line on stderr, exit 2.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from typing import Any

from llm.app import schema
from llm.app.spec import resolve
from llm.errors import LLMError


def summary(report: dict[str, Any]) -> str:
    """The report in a few lines: per source (a mixture) or for the corpus, documents, tokens and the cache entry."""
    lines = []
    if "sources" in report and "mixture" in report:  # data=mixture
        mix = report["mixture"]
        lines.append(f"mixture: {len(report['sources'])} sources, {mix.get('tokens_per_epoch', 0):,} tokens per epoch")
        header = f"  {'source':<16}{'weight':>8}{'docs kept':>12}{'tokens':>14}{'per epoch':>14}{'repeats':>9}  cache"
        lines.append(header)
        for name, s in report["sources"].items():
            cache = s.get("cache", {})
            lines.append(
                f"  {name:<16}{s['weight']:>8g}{s['documents']['kept']:>12,}{s['tokens_available']:>14,}"
                f"{s.get('tokens_per_epoch', 0):>14,}{s.get('repetitions_per_epoch', 0):>9.3f}  "
                f"{'hit' if cache.get('hit') else 'built'} {cache.get('dir', '')}"
            )
        lines.extend(_rules("  dropped", [s["corpus"] for s in report["sources"].values()]))
    elif "documents" in report:  # a corpus (data=corpus, data=text)
        docs, cache = report["documents"], report.get("cache", {})
        lines.append(f"documents: {docs['read']:,} read, {docs['kept']:,} kept, {docs['dropped']:,} dropped")
        lines.extend(_rules("dropped", [report]))
        lines.append(f"cache: {'hit' if cache.get('hit') else 'built'} {cache.get('key', '')}")
    tokens = report.get("tokens")
    if isinstance(tokens, dict):
        lines.append("tokens: " + ", ".join(f"{split} {n:,}" for split, n in tokens.items()))
    tok = report.get("tokenizer")
    if isinstance(tok, dict):
        lines.append(f"tokenizer: {tok.get('vocab_size')} tokens, {tok.get('source')}")
    return "\n".join(lines)


def _rules(prefix: str, reports: list[dict[str, Any]]) -> list[str]:
    dropped: dict[str, int] = {}
    for r in reports:
        for name, rule in r.get("rules", {}).items():
            dropped[name] = dropped.get(name, 0) + int(rule.get("dropped", 0))
    shown = ", ".join(f"{name} {n:,}" for name, n in dropped.items() if n)
    return [f"{prefix}: {shown}"] if shown else []


def prepare(argv: list[str]) -> Any:
    """The DataModule of ``python train.py *argv``, prepared (built into the cache, or loaded from it)."""
    spec = resolve(schema.compose(argv), overrides=argv, planning=True)
    with tempfile.TemporaryDirectory(prefix="llm-prepare-") as scratch:
        if spec.run_dir is None:  # composed outside a Hydra job; init_from's tokenizer is written here
            spec = dataclasses.replace(spec, run_dir=scratch)
        datamodule = spec.experiment.build_datamodule(spec)
        datamodule.prepare()
    return datamodule


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(
            __doc__.split("\n\n")[0] + "\n\nusage: python -m llm.prepare [key=value ...]  (the overrides of train.py)"
        )
        return 0
    try:
        datamodule = prepare(argv)
    except LLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(datamodule.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
