"""The ``key=value`` arguments of the commands that read one checkpoint (generate, chat, serve, inspect).

One parser, so every command refuses the same mistakes with the same one-line errors: an argument without ``=``,
an unknown key (the known ones listed), a missing ``ckpt_path``, and an ``allow_unsafe_checkpoint`` that is not a
boolean. Values are parsed as OmegaConf parses a dotlist (``temperature=0.7`` is a float, ``top_k=null`` None);
each command checks its own values' types and ranges.
"""

from __future__ import annotations

from typing import Any

from llm.errors import UserError


def parse_key_values(argv: list[str], defaults: dict[str, Any]) -> Any:
    """``argv`` over ``defaults`` (an OmegaConf DictConfig), or UserError naming the argument at fault."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    bad = [a for a in argv if "=" not in a]
    if bad:
        raise UserError(f"arguments are key=value, got {bad[0]!r} (known keys: {', '.join(defaults)})")
    try:
        args = OmegaConf.merge(OmegaConf.create(defaults), OmegaConf.from_dotlist(argv))
    except OmegaConfBaseException as err:
        raise UserError(f"could not parse the arguments: {str(err).splitlines()[0]}") from err
    unknown = sorted(set(args) - set(defaults))
    if unknown:
        raise UserError(f"unknown argument(s): {', '.join(unknown)} (known: {', '.join(defaults)})")
    if "ckpt_path" in defaults and not args.ckpt_path:
        raise UserError("ckpt_path=CKPT is required")
    if "allow_unsafe_checkpoint" in defaults and not isinstance(args.allow_unsafe_checkpoint, bool):
        raise UserError(f"allow_unsafe_checkpoint={args.allow_unsafe_checkpoint!r} must be true or false")
    return args
