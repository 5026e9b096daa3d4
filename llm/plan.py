"""`python -m llm.plan [the overrides of train.py]`: parameters, FLOPs per token and memory per device of a run,
then whether it fits. The estimate is llm/core/memory.py; the run is resolved as train.py resolves it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from llm.core.config import pad_vocab
from llm.core.memory import GB, Plan
from llm.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the repository's conf/, as train.py composes it

# ----------------------------------------------------------------------------------------- from the config


def _accelerator(trainer: DictConfig) -> str:
    acc = str(trainer.get("accelerator", "auto"))
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def _world_size(trainer: DictConfig, accelerator: str) -> int:
    devices = trainer.get("devices", 1)
    if devices in ("auto", -1, "-1"):
        devices = torch.cuda.device_count() if accelerator == "cuda" else 1
    elif isinstance(devices, str) and "," in devices:  # "0,1,3": a list of device indices
        devices = len([d for d in devices.split(",") if d.strip()])
    elif not isinstance(devices, (int, str)):  # a list of device indices
        devices = len(devices)
    try:
        n = int(devices)
    except ValueError as err:
        raise UserError(f"trainer.devices={devices!r} is not a number of devices") from err
    return max(1, n) * int(trainer.get("num_nodes", 1) or 1)


def _strategy(trainer: DictConfig) -> tuple[bool, bool]:
    """(sharded, activation checkpointing) from `trainer.strategy`: a name ("fsdp", "ddp", ...) or a node with a
    `_target_` (Lightning's FSDPStrategy or ModelParallelStrategy, ours) and maybe an activation_checkpointing key."""
    strategy = trainer.get("strategy", "auto")
    if isinstance(strategy, DictConfig):
        name = str(strategy.get("_target_", ""))
        checkpointing = strategy.get("activation_checkpointing") or strategy.get("activation_checkpointing_policy")
    else:
        name, checkpointing = str(strategy), False
    name = name.lower().replace("_", "")
    return ("fsdp" in name or "modelparallel" in name), bool(checkpointing)


def _vocab_size(cfg: DictConfig) -> int:
    """The model's vocabulary when model.vocab_size is null: it follows the tokenizer, padded as train.py pads it."""
    path = cfg.data.get("tokenizer")
    if path and Path(str(path)).expanduser().is_file():
        from tokenizers import Tokenizer

        return pad_vocab(Tokenizer.from_file(str(Path(str(path)).expanduser())).get_vocab_size())
    return pad_vocab(int(cfg.data.get("vocab_size") or 32000))  # a tokenizer still to be trained: at most this


def plan_from_config(cfg: DictConfig, vocab_size: int | None = None) -> Plan:
    """The plan of the run `cfg` describes. ``vocab_size``: the tokenizer's, when already known."""
    from hydra.utils import instantiate

    try:
        model = instantiate(cfg.model, _convert_="all")
    except Exception as err:  # Hydra wraps the ValueError of ModelConfig, which names the key
        cause = err.__cause__ or err
        raise UserError(f"model: {str(cause).strip().splitlines()[-1]}") from err
    if model.vocab_size is None:
        model = model.with_vocab(vocab_size or _vocab_size(cfg))
    trainer = cfg.trainer
    accelerator = _accelerator(trainer)
    sharded, checkpointing = _strategy(trainer)
    device = torch.device("cuda", 0) if accelerator == "cuda" else torch.device("cpu")
    memory_gb = OmegaConf.select(cfg, "plan.device_memory_gb", default=None)
    if memory_gb is not None and memory_gb <= 0:
        raise UserError(f"plan.device_memory_gb={memory_gb} must be positive (or null to ask the device)")
    present = accelerator == "cpu" or torch.cuda.is_available()
    if not present and not memory_gb:
        raise UserError(
            f"trainer.accelerator={trainer.get('accelerator')} but no GPU is visible here; "
            "give its memory to plan for it, e.g. plan.device_memory_gb=80"
        )
    if memory_gb:
        memory = int(memory_gb * GB)
    else:
        from llm.runtime.hardware import device_memory_bytes

        memory = device_memory_bytes(device)
    if accelerator == "cpu":
        name = "cpu (host memory)"
    else:
        name = torch.cuda.get_device_name(device) if present else "GPU (plan.device_memory_gb)"
    optim = cfg.get("optim") or {}
    impl = "fused" if optim.get("fused") else ("foreach" if optim.get("foreach") else "auto")
    data = cfg.data
    for key in ("batch_size", "seq_len"):
        if data.get(key) is None:
            raise UserError(f"plan: data.{key} is not set")
    return Plan(
        model=model,
        precision=trainer.get("precision"),
        world_size=_world_size(trainer, accelerator),
        sharded=sharded,
        activation_checkpointing=checkpointing,
        micro_batch=int(data.batch_size),
        seq_len=int(data.seq_len),
        grad_accumulation=int(trainer.get("accumulate_grad_batches") or 1),
        accelerator=accelerator,
        optimizer_impl=impl,
        device=name,
        device_memory=memory,
    )


def compose(overrides: list[str]) -> DictConfig:
    """The config `python train.py *overrides` composes; Hydra's errors become one-line UserErrors."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from llm.app import schema

    schema.register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_one_line(err)) from err
    finally:
        GlobalHydra.instance().clear()
    return cfg


def _one_line(err: BaseException) -> str:
    """Hydra's multi-line message in one line: its first line, the options it lists, the underlying cause."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    message = lines[0] if lines else type(err).__name__
    if any(line.startswith("Available options") for line in lines):
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options")) + 1
        end = next((i for i, line in enumerate(lines) if line.startswith("Config search path")), len(lines))
        options = [o for o in lines[start:end] if o != "schema" and not o.startswith("schema_")]
        message += f" (available: {', '.join(options)})"
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        message = message.rstrip(".") + f": {str(cause).strip().splitlines()[0]}"
    return message


def _resolved(cfg: DictConfig) -> DictConfig:
    """What train.py resolves before planning: trainer.precision=auto, and init_from's model shape."""
    from llm.app.builders import resolve_precision

    resolve_precision(cfg)
    if cfg.get("init_from"):
        from llm.app import experiments as tasks

        tasks.load_init(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.split("\n\n")[0] + "\n\nusage: python -m llm.plan [key=value ...]  (the overrides of train.py)")
        return 0
    try:
        cfg = _resolved(compose(argv))
        print(plan_from_config(cfg).report())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
