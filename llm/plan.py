"""`python -m llm.plan [the overrides of train.py]`: parameters, FLOPs per token and memory per device of a run,
then whether it fits, and if not, the micro-batch or activation checkpointing that would. The estimate is
llm/core/memory.py (adapters included: adapter=lora / qlora); the run is resolved as train.py resolves it, without
the checks of what only the run needs (init_from's weights, QLoRA's GPU).
"""

from __future__ import annotations

import sys

from llm.app import schema
from llm.app.spec import memory_plan, resolve
from llm.errors import LLMError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.split("\n\n")[0] + "\n\nusage: python -m llm.plan [key=value ...]  (the overrides of train.py)")
        return 0
    try:
        spec = resolve(schema.compose(argv), overrides=argv, planning=True)  # no init_from, no GPU needed
        print(memory_plan(spec).report())
    except LLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
