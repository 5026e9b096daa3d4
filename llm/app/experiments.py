"""What each ``experiment=`` builds: one object per task, chosen by the config's ``task`` key.

- ``pretrain``: a CausalLM from scratch (or continued from ``init_from``) on a text corpus;
- ``finetune``: a CausalLM from ``init_from`` on instruction data (``data=sft``) or text;
- ``classify``: a SequenceClassifier whose backbone comes from ``init_from`` (or is new) on ``data=classify``;
- ``eval``: the module of ``init_from``'s kind (language model or classifier), measured by llm/app/evaluate.py;
- ``dpo``: a PreferenceLM (llm/training/dpo.py) from ``init_from`` on preference pairs (``data=preference``).

Each experiment says what it needs (``init_from``, a kind of data) and builds the DataModule and the
LightningModule from the resolved run (llm/app/spec.py); train.py then trains or evaluates.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import lightning as L
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from llm.app.builders import build, build_optimizer
from llm.app.init_from import Init, write_tokenizer
from llm.app.schema import DATA_RUN_KEYS, DPOSchema
from llm.core.config import ModelConfig
from llm.errors import UserError
from llm.training import checkpoint
from llm.training.dpo import PreferenceLM, reference_state
from llm.training.module import CausalLM, SequenceClassifier, TransformerModule

if TYPE_CHECKING:
    from llm.app.spec import RunSpec

LANGUAGE_DATA = ("text", "sft")  # DataModule kinds a language model trains on (datamodules/base.py)
EXPERIMENT_OF_DATA = {"classify": "classify", "preference": "dpo"}  # the other kinds, and what trains on them


class Experiment:
    """The task of a run. Subclasses set what differs; the defaults are a language model's."""

    name: ClassVar[str]
    trains: ClassVar[bool] = True  # False: measure init_from, no training
    needs_init: ClassVar[bool] = False  # init_from is required

    def check(self, spec: RunSpec) -> None:
        """Refuse, before anything is built, a run this experiment cannot do."""
        if spec.adapter is not None and spec.init is None and self.trains:
            raise UserError(
                f"adapter={'qlora' if spec.adapter.quantize else 'lora'} trains adapters on frozen weights: give"
                " them as init_from=CKPT"
            )
        if self.needs_init and spec.init is None:
            raise UserError(
                f"experiment={self.name} needs init_from=CKPT: a .ckpt of pretraining, finetuning or classification,"
                " or one written by `python -m llm.convert from-hf`"
            )

    def is_classifier(self, init: Init | None) -> bool:
        return False

    def check_data(self, kind: str, init: Init | None) -> None:
        if kind not in LANGUAGE_DATA:
            raise UserError(
                f"experiment={self.name} trains a language model; data={kind} is for"
                f" experiment={EXPERIMENT_OF_DATA.get(kind, 'classify')}"
            )

    def language_module(self, spec: RunSpec, datamodule: L.LightningDataModule, **arguments: Any) -> CausalLM:
        """The LightningModule of a language model, from ``arguments`` (``model``, ``optimizer``, ...); DPO's differs."""
        return CausalLM(**arguments)

    # ------------------------------------------------------------------------------------------------- data

    def datamodule_settings(self, spec: RunSpec) -> dict[str, Any]:
        """What the run gives the data group besides its YAML: with ``init_from``, its tokenizer and chat template."""
        data, init = spec.cfg.data, spec.init
        given: dict[str, Any] = {}
        if init is not None and data.get("tokenizer") is None:
            if init.tokenizer_json is None:
                raise UserError(
                    f"init_from={init.path} holds no tokenizer: give the model's tokenizer as data.tokenizer=PATH"
                )
            given["tokenizer"] = str(write_tokenizer(init.tokenizer_json, spec.run_dir))
        if init is not None and init.chat_format is not None and "chat_template" in data and data.chat_template is None:
            given["chat_template"] = init.chat_format  # continue with the template the model learnt
        return given

    def build_datamodule(self, spec: RunSpec) -> L.LightningDataModule:
        drop = tuple(name for name, _, _ in DATA_RUN_KEYS)
        return build(spec.cfg.data, "data", drop=drop, **self.datamodule_settings(spec))

    # ----------------------------------------------------------------------------------------------- module

    def model_config(self, spec: RunSpec, datamodule: L.LightningDataModule) -> ModelConfig:
        """The model to build: the checkpoint's or the config's, its vocabulary fitting the tokenizer."""
        n_tokens, init = datamodule.vocab_size, spec.init
        if init is None:
            model = spec.model.with_vocab(n_tokens)
        else:
            model = spec.model
            if n_tokens > model.vocab_size:
                raise UserError(
                    f"data.tokenizer={spec.cfg.data.get('tokenizer')} has {n_tokens} tokens, more than the"
                    f" {model.vocab_size} embedding rows of init_from={init.path}: use the checkpoint's own tokenizer"
                    " (data.tokenizer=null)"
                )
        if datamodule.seq_len > model.max_seq_len:
            raise UserError(f"data.seq_len={datamodule.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
        return model

    def build_module(self, spec: RunSpec, datamodule: L.LightningDataModule) -> TransformerModule:
        """The LightningModule of the task, with ``init_from``'s weights (and tokenizer, chat template) loaded."""
        init = spec.init
        self.check_data(datamodule.kind, init)
        model = self.model_config(spec, datamodule)
        optimizer = build_optimizer(spec.cfg.optim) if self.trains else None
        scheduler = build(spec.cfg.sched, "sched") if self.trains else None
        classifier = self.is_classifier(init)
        adapter = spec.adapter.to_dict() if self.trains and spec.adapter is not None else None
        if classifier:
            module: TransformerModule = SequenceClassifier(
                model.to_dict(),
                labels=datamodule.labels,
                label_smoothing=spec.settings.label_smoothing,
                optimizer=optimizer,
                scheduler=scheduler,
                adapter=adapter,
            )
        else:
            module = self.language_module(
                spec, datamodule, model=model.to_dict(), optimizer=optimizer, scheduler=scheduler, adapter=adapter
            )
            module.token_bytes = datamodule.token_bytes  # for val/bpb
            if self.trains:
                module.z_loss = float(spec.cfg.optim.get("z_loss") or 0.0)

        from_checkpoint = init is not None and spec.cfg.data.get("tokenizer") is None
        module.tokenizer_json = init.tokenizer_json if from_checkpoint else datamodule.tokenizer.to_str()
        if init is not None and init.tokenizer_json and not from_checkpoint:
            if Tokenizer.from_str(init.tokenizer_json).get_vocab() != datamodule.tokenizer.get_vocab():
                print("warning: data.tokenizer is not init_from's tokenizer: token ids may mean other things")
        if datamodule.kind == "sft":
            module.chat_format, module.chat_template = datamodule.template.template, datamodule.template.jinja()
        elif init is not None:
            module.chat_format, module.chat_template = init.chat_format, init.chat_template
        if init is not None:
            module.checkpoint_extras = dict(init.extras)
            module.load_weights(init.state)
            if adapter is not None:  # adapter checkpoints name their base by path and content
                module.adapter_base = {"path": str(Path(init.path).resolve()), "sha256": checkpoint.digest(init.path)}
            if classifier and init.labels == module.labels and init.head:
                module.load_head(init.head)
            elif classifier and init.labels is not None:
                print(f"init_from={init.path}: its labels differ from the data's; the classifier head starts anew")
        return module


class Pretrain(Experiment):
    name = "pretrain"


class Finetune(Experiment):
    name = "finetune"
    needs_init = True


class Classify(Experiment):
    name = "classify"

    def check(self, spec: RunSpec) -> None:
        super().check(spec)
        if spec.topology.sharded:
            raise UserError(
                "experiment=classify does not run under trainer=fsdp yet (its head is not sharded): use ddp"
            )

    def is_classifier(self, init: Init | None) -> bool:
        return True

    def check_data(self, kind: str, init: Init | None) -> None:
        if kind != "classify":
            raise UserError("experiment=classify needs labelled data: data=classify (data.paths=[...])")


class Eval(Experiment):
    """Measures ``init_from``: a language model on text or SFT data, a classifier on labelled data."""

    name = "eval"
    trains = False
    needs_init = True

    def is_classifier(self, init: Init | None) -> bool:
        return init is not None and init.is_classifier

    def check_data(self, kind: str, init: Init | None) -> None:
        if self.is_classifier(init) and kind != "classify":
            raise UserError(f"init_from={init.path} is a classifier: evaluate it on labelled data (data=classify)")
        if not self.is_classifier(init) and kind not in (*LANGUAGE_DATA, "preference"):
            raise UserError(
                f"init_from={init.path} is a language model: evaluate it on data=corpus, text, sft or preference, or"
                " train a classifier from it first (experiment=classify)"
            )

    def language_module(self, spec: RunSpec, datamodule: L.LightningDataModule, **arguments: Any) -> CausalLM:
        if datamodule.kind == "preference":  # reward accuracy and margins against a reference policy
            return preference_module(spec, None, **arguments)
        return super().language_module(spec, datamodule, **arguments)

    def build_module(self, spec: RunSpec, datamodule: L.LightningDataModule) -> TransformerModule:
        module = super().build_module(spec, datamodule)
        if datamodule.kind == "preference":
            attach_reference(spec, module, evaluating=True)
        return module

    def datamodule_settings(self, spec: RunSpec) -> dict[str, Any]:
        """Data given as ``data.paths`` alone is evaluated whole (it becomes the val split); a text corpus with
        ``data.val_paths`` (given, or ``data.paths`` so) needs no train split (``data.train=false``)."""
        given = super().datamodule_settings(spec)
        data = spec.cfg.data
        if "val_paths" in data and data.get("val_paths") is None and data.get("paths") is not None:
            given["val_paths"] = data.paths
        if "train" in data and (data.get("val_paths") is not None or "val_paths" in given):
            given["train"] = False
        if spec.init.labels is not None and "labels" in data:
            given["labels"] = spec.init.labels
        return given


class Dpo(Experiment):
    """Preference tuning (DPO, IPO: ``dpo.*``) of ``init_from`` on ``data=preference``; the reference policy is
    ``init_from``'s weights, frozen after loading (with adapters: the base under them), or ``dpo.reference``."""

    name = "dpo"
    needs_init = True

    def check(self, spec: RunSpec) -> None:
        super().check(spec)
        dpo_settings(spec)  # dpo.* refused in one line before any data is read

    def check_data(self, kind: str, init: Init | None) -> None:
        if kind != "preference":
            raise UserError(f"experiment=dpo trains on preference pairs: data=preference, not data={kind}")

    def language_module(self, spec: RunSpec, datamodule: L.LightningDataModule, **arguments: Any) -> CausalLM:
        reference = dpo_settings(spec).reference or spec.init.path  # saved with the checkpoint: eval finds it
        return preference_module(spec, str(Path(reference).resolve()), **arguments)

    def build_module(self, spec: RunSpec, datamodule: L.LightningDataModule) -> TransformerModule:
        module = super().build_module(spec, datamodule)  # init_from's weights (and adapters) loaded
        module.chat_format, module.chat_template = datamodule.template.template, datamodule.template.jinja()
        attach_reference(spec, module, evaluating=False)
        return module


def dpo_settings(spec: RunSpec) -> DPOSchema:
    return DPOSchema(**OmegaConf.to_container(spec.cfg.dpo, resolve=True))  # checks the values (UserError)


def preference_module(spec: RunSpec, reference: str | None, **arguments: Any) -> PreferenceLM:
    s = dpo_settings(spec)
    return PreferenceLM(**arguments, beta=s.beta, label_smoothing=s.label_smoothing, loss=s.loss, reference=reference)


def attach_reference(spec: RunSpec, module: PreferenceLM, evaluating: bool) -> None:
    """The reference policy: with adapters, the model with them disabled; else ``dpo.reference``'s weights, else
    (training) a frozen copy of init_from's, (evaluating) the weights the DPO checkpoint names."""
    settings = dpo_settings(spec)
    path = settings.reference
    saved = (checkpoint.load_meta(spec.init.path).get("hyper_parameters") or {}) if evaluating else {}
    differ = [
        f"dpo.{k}={getattr(settings, k)} (trained with {saved[k]})"
        for k in ("beta", "label_smoothing", "loss")
        if k in saved and saved[k] != getattr(settings, k)
    ]
    if differ:  # the rewards scale with beta: these numbers are not the ones training logged
        print(f"note: init_from={spec.init.path} is measured with {', '.join(differ)}")
    if module.has_adapters():
        if path is not None:
            raise UserError(f"dpo.reference={path}: with adapters the reference is the base under them; drop it")
        module.freeze_reference()
        return
    if path is None and evaluating:
        path = saved.get("reference")
        if path is None:
            raise UserError(
                f"init_from={spec.init.path} names no reference policy (not a DPO checkpoint): give the model it was"
                " tuned from as dpo.reference=CKPT"
            )
        if not Path(path).exists():
            raise UserError(
                f"init_from={spec.init.path} names its reference {path}, not there: give dpo.reference=CKPT"
            )
    if path is None:
        module.freeze_reference()
    else:
        module.load_reference(reference_state(str(path), module))
        module.reference_path = str(path)


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (Pretrain(), Finetune(), Classify(), Eval(), Dpo())}


def experiment_of(task: str) -> Experiment:
    try:
        return EXPERIMENTS[task]
    except KeyError:
        raise UserError(f"task={task!r} is not known ({', '.join(EXPERIMENTS)})") from None
