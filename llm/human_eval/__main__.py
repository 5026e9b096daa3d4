"""python -m llm.human_eval new | serve | summary: a blind side-by-side study of two checkpoints.

    python -m llm.human_eval new STUDY_DIR --a CKPT --b CKPT|references --prompts FILE [--max-new-tokens N]
    python -m llm.human_eval serve STUDY_DIR [--host 127.0.0.1] [--port 8080]
    python -m llm.human_eval summary STUDY_DIR

Bad input is one line ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llm.errors import LLMError, UserError


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors (one line, exit 2 in main) instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m llm.human_eval", description="Blind side-by-side human evaluation.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    new = commands.add_parser("new", help="generate both answers to every prompt and write the study")
    new.add_argument("study_dir", type=Path)
    new.add_argument("--a", required=True, help="checkpoint A")
    new.add_argument("--b", required=True, help="checkpoint B, or 'references': the rows' reference answers")
    new.add_argument("--prompts", required=True, type=Path, help="JSON Lines: prompt, instruction or messages rows")
    new.add_argument("--max-new-tokens", type=int, default=256)
    new.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy")
    new.add_argument("--top-k", type=int, default=None)
    new.add_argument("--top-p", type=float, default=None)
    new.add_argument("--seed", type=int, default=0, help="with a temperature: row i samples with seed + i")
    new.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    new.add_argument("--device", default="cpu")
    new.add_argument(  # llm/training/safe_load.py's switch (not imported here: serve and summary need no torch)
        "--allow-unsafe-checkpoint", action="store_true", help="plain pickle: runs any code a checkpoint holds"
    )

    serve = commands.add_parser("serve", help="serve the rating page")
    serve.add_argument("study_dir", type=Path)
    serve.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (the default): this machine only")
    serve.add_argument("--port", type=int, default=8080, help="0: any free port (printed)")

    summary = commands.add_parser("summary", help="print and write summary.json")
    summary.add_argument("study_dir", type=Path)
    summary.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    summary.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return parser


def summarize(study_dir: Path, resamples: int = 10_000, seed: int = 0) -> dict:
    """summary.json's content: the study's sides (no longer blind) and the statistics of its ratings."""
    from llm.human_eval import stats
    from llm.human_eval.ratings import RATINGS_FILE, read_ratings
    from llm.human_eval.study import Study

    if resamples < 1:
        raise UserError(f"--resamples {resamples} must be >= 1")
    study = Study.load(study_dir)
    ratings = [r for r in read_ratings(study.root / RATINGS_FILE) if r["item"] in study.items]
    sides = {k: {f: study.meta[k].get(f) for f in ("kind", "name", "path", "sha256", "of")} for k in ("a", "b")}
    sides = {k: {f: v for f, v in side.items() if v is not None} for k, side in sides.items()}
    return {"a": sides["a"], "b": sides["b"], "items": len(study.items), **stats.summarize(ratings, resamples, seed)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
        if args.command == "new":
            from llm.human_eval.study import Settings, build
            from llm.training import safe_load

            safe_load.allow_unsafe(args.allow_unsafe_checkpoint)
            settings = Settings(
                args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, args.batch_size, args.device
            )
            build(args.study_dir, args.a, args.b, args.prompts, settings)
        elif args.command == "serve":
            from llm.human_eval.server import serve

            serve(args.study_dir, args.host, args.port)
        else:
            from llm.human_eval.stats import report

            result = summarize(args.study_dir, args.resamples, args.seed)
            a, b = result["a"], result["b"]
            print(f"A = {a.get('path', a['kind'])}\nB = {b.get('path', b['kind'])}")
            print(report(result))
            out = args.study_dir / "summary.json"
            out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            print(f"written: {out}")
    except LLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
