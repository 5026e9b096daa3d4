"""Resolve once: the composed config becomes a typed, frozen description of the run.

Every derived setting is computed here and nowhere else: the experiment, its typed settings, the topology
(processes, data-parallel replicas), the precision (``auto`` -> the fastest that trains correctly here), the
gradient accumulation (from ``data.global_batch_size``), the model (with ``init_from``'s shape merged in) and the
checkpoint to resume. ``train.py``, ``python -m llm.plan`` and the bench scripts all call ``resolve``; after it the
config is read-only, and the objects built from it get the resolved values as arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from llm.app.builders import build
from llm.app.experiments import Experiment, experiment_of
from llm.app.init_from import Init, explicit_model_keys, load_init
from llm.app.schema import ExperimentSettings
from llm.core.config import ModelConfig, pad_vocab
from llm.core.lora import LoRAConfig
from llm.core.memory import GB, PRECISIONS, Plan, normalise_precision
from llm.errors import UserError
from llm.runtime.hardware import device_memory_bytes, fastest_precision
from llm.runtime.topology import Topology
from llm.training.checkpoint import resolve_ckpt_path


@dataclass(frozen=True)
class RunSpec:
    """One run, resolved. ``cfg`` is the composed config (read-only); the fields are what was derived from it."""

    cfg: DictConfig
    experiment: Experiment
    settings: ExperimentSettings
    topology: Topology
    precision: str  # Lightning's spelling, never "auto"
    accumulation: int  # micro-batches per optimizer step
    limit_val_batches: int | float | None  # a held-out set (data.val_paths) is read whole unless set explicitly
    model: ModelConfig  # vocab_size None until the tokenizer is known (without init_from and model.vocab_size)
    init: Init | None
    adapter: LoRAConfig | None  # adapter=lora / qlora: adapters on init_from's frozen weights
    ckpt_path: str | None  # the checkpoint to resume, or None for a fresh run
    run_dir: Path | None  # None when composed outside a Hydra job (python -m llm.plan)
    seed: int

    def trainer_arguments(self) -> dict[str, object]:
        """The Trainer arguments this module derives, given to ``instantiate`` over the YAML's."""
        return {
            "precision": self.precision,
            "accumulate_grad_batches": self.accumulation,
            "limit_val_batches": self.limit_val_batches,
        }


def resolve(cfg: DictConfig, overrides: Sequence[str] | None = None, *, planning: bool = False) -> RunSpec:
    """The run ``cfg`` describes. ``overrides``: the command line's, to tell which ``model.*`` keys the user set
    (with ``init_from`` those must agree with the checkpoint); None reads them from Hydra when it runs the job.
    ``planning``: for ``python -m llm.plan``, which needs only the run's shapes: the checks of what the run itself
    needs (``init_from`` for finetune or adapters, QLoRA's CUDA GPU, the experiment's strategy) are skipped."""
    experiment = experiment_of(str(cfg.task))
    settings = ExperimentSettings(**OmegaConf.to_container(cfg.experiment, resolve=True))
    topology = Topology.from_trainer(cfg.trainer)
    precision = resolve_precision(cfg.trainer.get("precision"), topology.accelerator)
    accumulation = resolve_accumulation(
        cfg.data.get("global_batch_size"),
        int(cfg.data.batch_size),
        topology.data_parallel_size,
        int(cfg.trainer.get("accumulate_grad_batches") or 1),
    )
    command_line = _command_line() if overrides is None else list(overrides)
    limit_val_batches = cfg.trainer.get("limit_val_batches")
    typed = {o.split("=", 1)[0].lstrip("+~") for o in command_line}
    if cfg.data.get("val_paths") is not None and "trainer.limit_val_batches" not in typed:
        limit_val_batches = 1.0  # a held-out set is evaluated whole: a part of it would be another set
    adapter = build(cfg.adapter, "adapter") if cfg.get("adapter") is not None else None
    if not planning:
        check_adapter(adapter, topology, experiment)  # before init_from loads: QLoRA may not be possible here
    init = None
    if cfg.init_from is not None:
        init = load_init(str(cfg.init_from), cfg.model, explicit_model_keys(command_line))
    model = init.model if init is not None else build(cfg.model, "model")
    run_dir = OmegaConf.select(cfg, "run_dir", throw_on_resolution_failure=False)
    spec = RunSpec(
        cfg=cfg,
        experiment=experiment,
        settings=settings,
        topology=topology,
        precision=precision,
        accumulation=accumulation,
        limit_val_batches=limit_val_batches,
        model=model,
        init=init,
        adapter=adapter,
        ckpt_path=resolve_ckpt_path(cfg.ckpt_path, run_dir) if experiment.trains else None,
        run_dir=None if run_dir is None else Path(str(run_dir)),
        seed=int(cfg.seed),
    )
    if not planning:
        experiment.check(spec)
    OmegaConf.set_readonly(cfg, True)  # nothing downstream changes the run's description
    return spec


def check_adapter(adapter: LoRAConfig | None, topology: Topology, experiment: Experiment) -> None:
    """QLoRA needs CUDA and bitsandbytes; evaluation reads adapters from init_from, not from adapter=."""
    if adapter is None:
        return
    if not experiment.trains:
        raise UserError(
            f"experiment={experiment.name} measures init_from as it is (its adapters included): drop adapter="
        )
    if adapter.quantize is None:
        return
    if topology.accelerator != "cuda" or not torch.cuda.is_available():
        raise UserError(
            "adapter=qlora stores the frozen weights in 4-bit NF4 with bitsandbytes, which needs a CUDA GPU"
            f" (here: trainer.accelerator={topology.accelerator}, CUDA available: {torch.cuda.is_available()});"
            " use adapter=lora"
        )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError('adapter=qlora needs bitsandbytes: pip install -e ".[qlora]"')


def _command_line() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def resolve_precision(precision: str | int | None, accelerator: str) -> str:
    """``trainer.precision`` in Lightning's spelling; ``auto`` becomes the fastest that trains correctly here."""
    if precision == "auto":
        return fastest_precision(accelerator)
    try:
        return normalise_precision(precision)
    except UserError:
        raise UserError(f"trainer.precision={precision!r} is not one of auto, {', '.join(PRECISIONS)}") from None


def resolve_accumulation(global_batch_size: int | None, batch_size: int, replicas: int, configured: int) -> int:
    """``data.global_batch_size`` (samples per optimizer step) sets the accumulation; else the trainer's setting."""
    if not global_batch_size:
        return configured
    per_step = batch_size * replicas
    if global_batch_size % per_step:
        raise UserError(
            f"data.global_batch_size={global_batch_size} is not a multiple of data.batch_size x data-parallel"
            f" replicas = {batch_size} x {replicas} = {per_step}"
        )
    return global_batch_size // per_step


# ------------------------------------------------------------------------------------------------- memory plan


def memory_plan(spec: RunSpec, vocab_size: int | None = None) -> Plan:
    """The memory plan of the run; ``vocab_size``: the tokenizer's, when already known."""
    cfg, topology = spec.cfg, spec.topology
    model = spec.model
    if model.vocab_size is None:
        model = model.with_vocab(vocab_size or _vocab_estimate(cfg))
    on_gpu = topology.accelerator == "cuda"
    memory_gb = cfg.plan.device_memory_gb
    if memory_gb is not None and memory_gb <= 0:
        raise UserError(f"plan.device_memory_gb={memory_gb} must be positive (or null to ask the device)")
    present = not on_gpu or torch.cuda.is_available()
    if not present and not memory_gb:
        raise UserError(
            f"trainer.accelerator={cfg.trainer.get('accelerator')} but no GPU is visible here; "
            "give its memory to plan for it, e.g. plan.device_memory_gb=80"
        )
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    memory = int(memory_gb * GB) if memory_gb else device_memory_bytes(device)
    if not on_gpu:
        name = "cpu (host memory)"
    else:
        name = torch.cuda.get_device_name(device) if present else "GPU (plan.device_memory_gb)"
    optim = cfg.get("optim") or {}
    for key in ("batch_size", "seq_len"):
        if cfg.data.get(key) is None:
            raise UserError(f"plan: data.{key} is not set")
    return Plan(
        model=model,
        precision=spec.precision,
        world_size=topology.world_size,
        sharded=topology.sharded,
        activation_checkpointing=topology.activation_checkpointing,
        micro_batch=int(cfg.data.batch_size),
        seq_len=int(cfg.data.seq_len),
        grad_accumulation=spec.accumulation,
        accelerator=topology.accelerator,
        optimizer_impl="fused" if optim.get("fused") else ("foreach" if optim.get("foreach") else "auto"),
        optimizer_kind="muon" if str(optim.get("_target_", "")).endswith("MuonAdamW") else "adamw",
        segment_mask=bool(cfg.data.get("document_mask") or cfg.data.get("packing")),
        device=name,
        device_memory=memory,
        adapter=spec.adapter,
        data_parallel=topology.data_parallel_size,
    )


def _vocab_estimate(cfg: DictConfig) -> int:
    """The model's vocabulary before the tokenizer is built: the given tokenizer's, else data.vocab_size (at most)."""
    path = cfg.data.get("tokenizer")
    if path and Path(str(path)).expanduser().is_file():
        from tokenizers import Tokenizer

        return pad_vocab(Tokenizer.from_file(str(Path(str(path)).expanduser())).get_vocab_size())
    return pad_vocab(int(cfg.data.get("vocab_size") or 32000))
