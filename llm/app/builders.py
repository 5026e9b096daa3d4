"""Turning composed config nodes into the objects ``train.py`` wires together (``_target_`` + instantiate)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from llm.app.loggers import built_here, check_installed, forwarded_to, var_keyword
from llm.app.schema import OPTIM_RUN_KEYS
from llm.errors import LLMError, UserError

# What a constructor raises on purpose about a configured value: ours, and Lightning's own configuration error.
# Any other exception is a bug and keeps its traceback.
_DELIBERATE = (LLMError, MisconfigurationException)


def build(node: DictConfig, group: str, *, drop: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)`` (``kwargs`` win over the YAML), without the keys in ``drop``; a value the
    target refuses on purpose is reported on one line naming the group (``model: ...``)."""
    if drop:
        container = OmegaConf.to_container(node, resolve=True)
        node = {k: v for k, v in container.items() if k not in drop}
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, _DELIBERATE):
            raise UserError(f"{group}: {_last_line(cause)}") from err
        raise


def build_optimizer(node: DictConfig) -> Any:
    """The partial optimizer of ``conf/optim``, without the keys the module reads (``z_loss``)."""
    return build(node, "optim", drop=tuple(name for name, _, _ in OPTIM_RUN_KEYS))


def build_all(nodes: DictConfig | None, **given: Mapping[str, Any]) -> list:
    """Instantiate every ``_target_`` entry of a dict-of-objects group (callbacks, logger).

    ``given`` adds arguments per entry name (``hparams={"planned_memory_gb": 1.2}``). An entry set to null is
    dropped, so `callbacks.samples=null` removes one callback; a periodic checkpoint whose interval is null is
    dropped too, as it would otherwise save at every validation. These groups have no schema, so each entry's
    keys are checked against its target's signature first: a misspelt key is named on one line.
    """
    objects = []
    for name, node in (nodes or {}).items():
        if node is None:
            continue
        if "every_n_train_steps" in node and node.every_n_train_steps is None:
            continue
        if not built_here(node):  # an MLflow database store: rank 0 alone opens it
            continue
        extra = dict(given.get(name, {}))
        check_installed(str(name), node)  # a tracker's missing package: one line, not Lightning's traceback
        _check_arguments(str(name), node, extra)
        try:
            objects.append(instantiate(node, _convert_="all", **extra))
        except InstantiationException as err:
            if isinstance(err.__cause__, _DELIBERATE):
                raise UserError(f"{name}: {_last_line(err.__cause__)}") from err
            raise
    return objects


def check_all(nodes: DictConfig | None) -> None:
    """``build_all``'s checks alone, building nothing: train.py runs them on the loggers before the data is prepared,
    so a tracker's missing package or a misspelt key fails at once."""
    for name, node in (nodes or {}).items():
        if node is not None:
            check_installed(str(name), node)
            _check_arguments(str(name), node, {})


def _check_arguments(name: str, node: DictConfig, extra: Mapping[str, Any]) -> None:
    target = node.get("_target_")
    try:
        obj = get_object(str(target))
    except Exception as err:  # Hydra raises ImportError or its own error for a wrong path
        raise UserError(f"`{name}`: _target_ {target!r} cannot be imported ({_last_line(err)})") from err
    keys = {str(k) for k in node if not (str(k).startswith("_") and str(k).endswith("_"))} | set(extra)
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    try:
        bound = signature.bind(**dict.fromkeys(keys))
        forwarded = bound.arguments.get(var_keyword(signature) or "", {})
        receiver = forwarded_to(obj)  # a logger's **kwargs go on to wandb.init / SummaryWriter at its first metric
        if forwarded and receiver is not None:
            inspect.signature(receiver).bind(**forwarded)
    except TypeError as err:
        raise UserError(f"`{name}` ({target}): {err}") from err


def _last_line(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
