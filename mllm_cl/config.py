"""One config system: every setting is a field of a dataclass here, read from JSON files and `key=value`
overrides, with named presets kept as data.

    models      LLMConfig (+ LLM_PRESETS), VisionConfig (+ VISION_PRESETS)
    runs        TrainConfig (one trainer run), StageConfig (one train.py stage, with TaskSpec and EvalSpec),
                ExperimentConfig (the shared stages and one continual run per method)
    I/O         load_json, apply_overrides, to_dict: unknown keys and wrong types are ConfigErrors

Model presets follow litgpt: one `LLMConfig` describes both GPT-NeoX (Pythia) and LLaMA (Vicuna,
SmolLM2) through a handful of flags; `VisionConfig` describes a CLIP ViT tower.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mllm_cl.errors import UserError
from mllm_cl.json_files import read_json
from mllm_cl.projector import projector_depth

T = TypeVar("T")


# In `input_ids`, each position an image's projected patch features will fill holds this id (one per
# image token, expanded at collate time); in `labels`, this id marks a position left out of the loss.
IMAGE_PLACEHOLDER_ID = -200
IGNORE_INDEX = -100


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the dataclass it targets."""


def check_fields(config: Any, positive: tuple[str, ...] = (), positive_float: tuple[str, ...] = (),
                 unit: tuple[str, ...] = (), token_ids: tuple[str, ...] = ()) -> None:
    """ConfigError naming the first field that is not a positive int, a positive finite number, a number in
    [0, 1] or a token id (an int >= 0, or None), as listed."""
    name = type(config).__name__

    def fail(key: str, wanted: str) -> ConfigError:
        return ConfigError(f"{name}.{key} must be {wanted}, got {getattr(config, key)!r}")

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value: Any) -> bool:
        return (is_int(value) or isinstance(value, float)) and math.isfinite(value)

    for key in positive:
        if not (is_int(getattr(config, key)) and 0 < getattr(config, key) < 2 ** 31):
            raise fail(key, "a positive integer (below 2^31)")
    for key in positive_float:
        if not (is_number(getattr(config, key)) and getattr(config, key) > 0):
            raise fail(key, "a positive number")
    for key in unit:
        if not (is_number(getattr(config, key)) and 0 <= getattr(config, key) <= 1):
            raise fail(key, "a number in [0, 1]")
    for key in token_ids:
        value = getattr(config, key)
        if value is not None and not (is_int(value) and 0 <= value < 2 ** 31):
            raise fail(key, "a token id (an integer >= 0) or null")


# A name that becomes a folder (a task's, a method run's): no path separator, no leading dot, nothing to escape.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,99}")
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")  # the devices the trainer and the evaluators run on


def check_plain_name(name: str, what: str) -> None:
    """ConfigError unless `name` can be a folder name inside an output folder (PLAIN_NAME)."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise ConfigError(f"{what} {name!r} must be a plain name: letters, digits and _ . + = - (not first: "
                          f". + = -), at most 100 characters, no path separator; it names a folder")


def check_device(device: str, where: str) -> None:
    if not isinstance(device, str) or not DEVICE_NAME.fullmatch(device):
        raise ConfigError(f"{where} must be auto, cpu, cuda or cuda:N, got {device!r}")


# What a config file may ask for before anything is allocated: beyond these it is a typo or a hostile file (the
# largest published models have ~130 layers and 128k-token contexts; a 2^30-token rope table takes 34 GB).
MAX_LAYERS = 1024
MAX_SEQ_LEN = 2 ** 20
MAX_WIDTH = 2 ** 16  # d_model, d_ff, heads: the largest real ones are below 2^15


def check_size(config: Any, layers: tuple[str, ...], widths: tuple[str, ...], lengths: tuple[str, ...] = ()) -> None:
    """ConfigError naming the first field over MAX_LAYERS, MAX_WIDTH or MAX_SEQ_LEN."""
    for keys, bound, what in ((layers, MAX_LAYERS, "layers"), (widths, MAX_WIDTH, "width"),
                              (lengths, MAX_SEQ_LEN, "positions")):
        for key in keys:
            if getattr(config, key) > bound:
                raise ConfigError(f"{type(config).__name__}.{key}={getattr(config, key)} is over {bound:,} ({what}), "
                                  "more than any real model has: a typo, or a file not meant for a model")


@dataclass
class LLMConfig:
    """A decoder-only transformer. `arch` picks the Hugging Face layout it is read from and written to."""

    name: str = "tiny"
    arch: str = "gpt_neox"  # "gpt_neox" (Pythia) or "llama" (LLaMA, Vicuna, SmolLM2)
    vocab_size: int = 512
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4  # < n_head: grouped-query attention
    d_model: int = 128
    d_ff: int = 512
    rotary_pct: float = 1.0  # share of each head's dims that get rotary embeddings (Pythia: 0.25)
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # "gelu" (Linear-GELU-Linear) or "swiglu"
    bias: bool = True  # biases on every linear layer (GPT-NeoX) or none (LLaMA)
    parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x)) instead of two sequential residuals
    tie_embeddings: bool = False
    dropout: float = 0.0  # on attention output and MLP output (all real presets: 0)
    init_std: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        check_fields(self, positive=("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "max_seq_len"),
                     positive_float=("rope_theta", "norm_eps", "init_std"), unit=("rotary_pct", "dropout"),
                     token_ids=("bos_token_id", "eos_token_id", "pad_token_id"))
        check_size(self, ("n_layer",), ("n_head", "n_kv_head", "d_model", "d_ff"), ("max_seq_len",))
        if self.arch not in ("gpt_neox", "llama"):
            raise ConfigError(f"LLMConfig.arch must be 'gpt_neox' or 'llama', got {self.arch!r}")
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.norm not in ("layernorm", "rmsnorm") or self.mlp not in ("gelu", "swiglu"):
            raise ConfigError(f"unknown norm {self.norm!r} or mlp {self.mlp!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)


@dataclass
class VisionConfig:
    """A CLIP ViT vision tower and which of its features LLaVA takes."""

    name: str = "clip-tiny"
    image_size: int = 64
    patch_size: int = 8
    num_channels: int = 3
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_ff: int = 512
    norm_eps: float = 1e-5
    projection_dim: int = 128  # CLIP's joint image/text embedding width (pretrain-vision only)
    select_layer: int = -2  # hidden states of this encoder layer (LLaVA: the second to last)
    select_feature: str = "patch"  # "patch" drops the class token, "cls_patch" keeps it

    def __post_init__(self) -> None:
        check_fields(self, positive=("image_size", "patch_size", "num_channels", "d_model", "n_layer", "n_head",
                                     "d_ff", "projection_dim"), positive_float=("norm_eps",))
        check_size(self, ("n_layer",), ("image_size", "num_channels", "n_head", "d_model", "d_ff", "projection_dim"))
        n = self.n_layer
        if not isinstance(self.select_layer, int) or not -(n + 1) <= self.select_layer <= n:
            raise ConfigError(f"VisionConfig.select_layer={self.select_layer!r} is out of range for a tower with {n} "
                              f"layers: use an index of its {n + 1} hidden states, from {-(n + 1)} to {n}")
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ConfigError(f"select_feature must be 'patch' or 'cls_patch', got {self.select_feature!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """How many positions one image takes in the LLM's sequence."""
        return self.num_patches + (1 if self.select_feature == "cls_patch" else 0)


def _pythia(name: str, d_model: int, n_layer: int, n_head: int) -> dict[str, Any]:
    return dict(name=name, arch="gpt_neox", vocab_size=50304, n_layer=n_layer, n_head=n_head, n_kv_head=n_head,
                d_model=d_model, d_ff=4 * d_model, rotary_pct=0.25, rope_theta=10000.0, max_seq_len=2048,
                norm="layernorm", norm_eps=1e-5, mlp="gelu", bias=True, parallel_residual=True,
                tie_embeddings=False, bos_token_id=0, eos_token_id=0)


def _llama(name: str, **kw: Any) -> dict[str, Any]:
    base = dict(name=name, arch="llama", norm="rmsnorm", mlp="swiglu", bias=False, parallel_residual=False,
                rotary_pct=1.0, bos_token_id=1, eos_token_id=2)
    return {**base, **kw}


LLM_PRESETS: dict[str, dict[str, Any]] = {
    "pythia-14m": _pythia("pythia-14m", 128, 6, 4),
    "pythia-70m": _pythia("pythia-70m", 512, 6, 8),
    "pythia-160m": _pythia("pythia-160m", 768, 12, 12),
    "pythia-410m": _pythia("pythia-410m", 1024, 24, 16),
    "pythia-1b": _pythia("pythia-1b", 2048, 16, 8),
    "pythia-1.4b": _pythia("pythia-1.4b", 2048, 24, 16),
    "pythia-2.8b": _pythia("pythia-2.8b", 2560, 32, 32),
    "vicuna-7b": _llama("vicuna-7b", vocab_size=32000, n_layer=32, n_head=32, n_kv_head=32, d_model=4096,
                        d_ff=11008, max_seq_len=4096, norm_eps=1e-5, tie_embeddings=False, pad_token_id=0),
    "llama-2-7b": _llama("llama-2-7b", vocab_size=32000, n_layer=32, n_head=32, n_kv_head=32, d_model=4096,
                         d_ff=11008, max_seq_len=4096, norm_eps=1e-5, tie_embeddings=False),
    "smollm2-135m": _llama("smollm2-135m", vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576,
                           d_ff=1536, max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True,
                           pad_token_id=2),
    # The CPU demo's language model: Pythia's architecture at a size two cores train in minutes.
    "tiny": dict(_pythia("tiny", 128, 4, 4), vocab_size=1024, d_ff=512, max_seq_len=512),
}

VISION_PRESETS: dict[str, dict[str, Any]] = {
    "clip-vit-l-14-336": dict(name="clip-vit-l-14-336", image_size=336, patch_size=14, d_model=1024, n_layer=24,
                              n_head=16, d_ff=4096, projection_dim=768),
    "clip-vit-b-16": dict(name="clip-vit-b-16", image_size=224, patch_size=16, d_model=768, n_layer=12, n_head=12,
                          d_ff=3072, projection_dim=512),
    "clip-tiny": dict(name="clip-tiny", image_size=64, patch_size=8, d_model=128, n_layer=4, n_head=4, d_ff=512,
                      projection_dim=128),
}


def llm_preset(name: str, **overrides: Any) -> LLMConfig:
    if name not in LLM_PRESETS:
        raise ConfigError(f"unknown LLM preset {name!r}; known: {', '.join(sorted(LLM_PRESETS))}")
    return LLMConfig(**{**LLM_PRESETS[name], **overrides})


def vision_preset(name: str, **overrides: Any) -> VisionConfig:
    if name not in VISION_PRESETS:
        raise ConfigError(f"unknown vision preset {name!r}; known: {', '.join(sorted(VISION_PRESETS))}")
    return VisionConfig(**{**VISION_PRESETS[name], **overrides})


# ---------------------------------------------------------------- runs: training, stages, experiments

DISTRIBUTED_ENGINES = ("auto", "none", "ddp", "fsdp")  # TrainConfig.distributed (mllm_cl.distributed.engine)


@dataclass
class TrainConfig:
    steps: int = 0  # optimizer steps; 0: `epochs` passes over the data
    epochs: int = 1  # passes over the data, when steps is 0
    global_batch_size: int = 8  # samples per optimizer step
    micro_batch_size: int = 8  # samples per forward; gradient accumulation = global / micro
    lrs: dict[str, float] = field(default_factory=lambda: {"": 1e-3})  # param-name prefix -> learning rate
    weight_decay: float = 0.0  # never on biases and norms
    decay_embeddings: bool = True  # False: no weight decay on nn.Embedding weights either
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's beta1, beta2
    warmup_ratio: float = 0.03  # share of the steps with a linear warmup, then a cosine decay
    min_lr_ratio: float = 0.0  # the cosine ends at lr x min_lr_ratio
    max_grad_norm: float = 1.0  # 0: no clipping
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "fp32", "bf16", "fp16"
    activation_checkpointing: bool = False  # on every block of each nn.ModuleList named `blocks`
    compile: str = ""  # a torch.compile backend ("inductor") for the LLM's blocks while training; "": eager
    log_every: int = 10  # steps between progress lines (and log.jsonl records)
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    seed: int = 0  # model init, data order, dropout (each stage and task derives its own from it)
    device: str = "auto"  # "auto": cuda if available
    resume: bool = False  # continue from out_dir/checkpoint if there is one
    # under torchrun: "ddp" (DistributedDataParallel), "fsdp" (FSDP2's fully_shard), "none" (one process only);
    # "auto": ddp with several processes, none with one (see mllm_cl.parallel)
    distributed: str = "auto"

    def __post_init__(self) -> None:
        problems = []
        if self.micro_batch_size <= 0 or self.global_batch_size <= 0 or self.global_batch_size % self.micro_batch_size:
            problems.append(f"global_batch_size={self.global_batch_size} must be a positive multiple of "
                            f"micro_batch_size={self.micro_batch_size}")
        if self.steps < 0 or (self.steps == 0 and self.epochs <= 0):
            problems.append(f"set steps > 0 or epochs > 0 (got steps={self.steps}, epochs={self.epochs})")
        if self.log_every <= 0 or self.save_every < 0:
            problems.append(f"log_every must be > 0 and save_every >= 0 (got {self.log_every}, {self.save_every})")
        if not self.lrs or any(not (math.isfinite(lr) and lr >= 0) for lr in self.lrs.values()):
            problems.append(f"lrs must map param-name prefixes to finite learning rates >= 0, got {self.lrs}")
        for name, low, high in (("warmup_ratio", 0, 1), ("min_lr_ratio", 0, 1), ("weight_decay", 0, math.inf),
                                ("max_grad_norm", 0, math.inf)):
            value = getattr(self, name)
            if not (math.isfinite(value) and low <= value <= high):
                problems.append(f"{name} must be " + (f"in [{low}, {high}]" if high < math.inf else
                                                       f"a finite number >= {low}") + f", got {value}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        try:
            check_device(self.device, "device")
        except ConfigError as e:
            problems.append(str(e))
        if self.distributed not in DISTRIBUTED_ENGINES:
            problems.append(f"distributed must be one of {', '.join(DISTRIBUTED_ENGINES)}, got {self.distributed!r}")
        if problems:
            raise ConfigError("train settings: " + "; ".join(problems))

    @property
    def accumulation(self) -> int:
        return self.global_batch_size // self.micro_batch_size


# TrainConfig fields a resumed run may change: they do not change what is computed.
RESUMABLE_TRAIN_FIELDS = ("resume", "device", "log_every", "save_every")

STAGES = ("pretrain-text", "pretrain-vision", "align", "finetune", "continual")


@dataclass
class TaskSpec:
    """One continual task: its LLaVA JSON train and test files and their image folder (no test: the task is
    scored by the evaluation's other measures, as paper 2's continual pretraining is)."""

    name: str = ""
    train: str = ""
    test: str = ""
    image_folder: str = ""

    def __post_init__(self) -> None:
        if self.name:
            check_plain_name(self.name, "task name")


@dataclass
class EvalSpec:
    """What the continual stage measures after every task."""

    nl_files: list[str] = field(default_factory=list)  # NL request files (JSONL, docs/CONTRACTS.md)
    nl_limit: int = 0  # first N documents of each NL file (0: all)
    vl_limit: int = 0  # first N test samples of each VL task (0: all)
    batch_size: int = 32  # evaluation batch
    max_new_tokens: int = 8  # VL answers are generated greedily up to this many tokens
    # VL tests outside the task sequence, measured after every task (paper 2's general VL benchmarks)
    general_vl: list[TaskSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_fields(self, positive=("batch_size", "max_new_tokens"))
        for key in ("nl_limit", "vl_limit"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 31:
                raise ConfigError(f"EvalSpec.{key} must be an integer >= 0 (0: all), got {value!r}")


@dataclass
class StageConfig:
    stage: str = "finetune"  # one of STAGES (train.py's STAGE argument sets it)
    out_dir: str = "runs/stage"  # model/, log.jsonl, stage_config.json, the trainer checkpoint
    llm: str = "tiny"  # a preset name (built from scratch) or an HF LLM folder
    vision: str = "clip-tiny"  # a preset name (built from scratch) or an HF CLIP folder
    projector: str = "mlp2x_gelu"  # "linear" or mlp<N>x_gelu (LLaVA-1.5: mlp2x_gelu)
    init: str = ""  # a multimodal folder to start from (finetune, continual)
    tokenizer: str = ""  # tokenizer folder or tokenizer.json, when the LLM is built from a preset
    template: str = ""  # chat template; "": the one `init` was trained with (LLaVA-1.5: vicuna_v1), else pythia
    train_file: str = ""  # text corpus (pretrain-text) or LLaVA JSON/JSONL (the other stages)
    image_folder: str = ""  # the folder the samples' "image" paths are relative to
    max_len: int = 512  # tokens per sample, image tokens included; longer samples are cut
    skip_bad: bool = False  # skip (and count) malformed samples instead of stopping at the first
    tasks: list[TaskSpec] = field(default_factory=list)  # continual
    inquiries: str = ""  # text-only inquiries for UIR (LLaVA JSON without images)
    initial_eval: str = ""  # continual: init's scores before any task, cached (default <out_dir>/initial_eval.json)
    # continual: the CL methods, composed (mllm_cl/methods)
    methods: list[str] = field(default_factory=lambda: ["naive"])
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> its constructor's options
    eval: EvalSpec = field(default_factory=EvalSpec)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        check_model_fields(self)


def check_model_fields(config: Any) -> None:
    """The settings a stage or an experiment builds its model from that no later check would catch in time."""
    check_fields(config, positive=("max_len",))
    try:
        projector_depth(config.projector)
    except ValueError as e:
        raise ConfigError(f"projector: {e}") from None


class StageError(UserError, ValueError):
    """A stage config that cannot run: the message says which field and what to set."""


def require(cfg: StageConfig, *names: str) -> None:
    missing = [n for n in names if not getattr(cfg, n)]
    if missing:
        raise StageError(f"stage {cfg.stage!r} needs {', '.join(missing)} (set them in the config or as key=value)")


def _train(**kw: Any) -> Any:
    return field(default_factory=lambda: TrainConfig(**kw))


@dataclass
class ExperimentConfig:
    name: str = "demo"  # names the experiment in reports, and its folder when another runs it `then`
    out_dir: str = "runs/demo"  # every stage's folder, a folder per method run, results.json, REPORT.md
    world: str = "data/synthetic"  # the synthetic world's folder (images, tasks, NL files, tokenizer)
    world_size: str = "demo"  # generated with this size when `world` holds no world.json ("" : never generate)
    world_seed: int = 0  # the synthetic world's generator seed
    llm: str = "tiny"  # a preset (pre-trained here on the world's text) or an HF LLM folder
    vision: str = "clip-tiny"  # a preset (pre-trained here on the world's captions) or an HF CLIP folder
    tokenizer: str = ""  # default: the world's tokenizer.json when `llm` is a preset, else the LLM folder's
    projector: str = "mlp2x_gelu"  # "linear" or mlp<N>x_gelu
    template: str = "pythia"  # chat template: pythia, vicuna_v1 or chatml
    max_len: int = 256  # tokens per sample, image tokens included
    text_corpus: str = ""  # default: <world>/text/train.txt
    align_file: str = ""  # default: <world>/align.json
    inquiries: str = ""  # default: <world>/inquiries.json
    # "paper1": the tasks start from the aligned model. "paper2" (LLaVA-c): a shared `finetune` stage first
    # instruction-tunes it on a general mix (general_file), and its held-out VL part (general_test) is measured
    # beside NL after every task. "paper2-pretrain" (LLaVA-c's continual pretraining): from the aligned model,
    # the general mix's parts are the tasks, beside `finetune` as the mix learned at once
    # (mllm_cl.continual_pretraining).
    protocol: str = "paper1"
    general_file: str = ""  # default: <world>/general/train.json
    general_test: str = ""  # default: one test per skill of the mix, <world>/general/<skill>/test.json
    # paper 2's Figure 4 (protocol paper2): curve name -> method run whose model after the first task is
    # consolidated at every alpha of alpha_curve_alphas, e.g. {"vanilla": "lora", "uir": "lora+uir"}
    alpha_curves: dict[str, str] = field(default_factory=dict)
    alpha_curve_alphas: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])  # curves' x
    ablation: list[str] = field(default_factory=list)  # paper 2's Table 4: the ablation's method runs, in order
    # paper 2's Figure 1: the method run whose methods also learn every task at once (their training sets mixed, as
    # many steps as the whole sequence): the multitask reference point
    joint_run: str = ""
    tasks: list[TaskSpec] = field(default_factory=list)  # default: the world's tasks (see world_tasks)
    world_tasks: list[str] = field(default_factory=list)  # which of the world's tasks, in order (default: all)
    nl_files: list[str] = field(default_factory=list)  # default: <world>/nl/*.jsonl
    pretrain_text: TrainConfig = _train(epochs=1, global_batch_size=16, micro_batch_size=16, lrs={"": 3e-3})
    pretrain_vision: TrainConfig = _train(epochs=2, global_batch_size=64, micro_batch_size=64, lrs={"": 1e-3})
    align: TrainConfig = _train(epochs=1, global_batch_size=32, micro_batch_size=32, lrs={"": 1e-3})
    finetune: TrainConfig = _train(epochs=1, global_batch_size=16, micro_batch_size=16, lrs={"": 1e-3})
    task_train: TrainConfig = _train(epochs=1, global_batch_size=16, micro_batch_size=16, lrs={"": 1e-3})
    eval: EvalSpec = field(default_factory=EvalSpec)
    methods: dict[str, list[str]] = field(default_factory=lambda: {"naive": ["naive"]})  # run name -> methods
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> options, every run
    # run name -> task_train fields that differ for that run (paper 1: lr 2e-5 full fine-tuning, 2e-4 LoRA)
    run_train: dict[str, dict[str, Any]] = field(default_factory=dict)
    # run name -> method -> options that differ for that run (paper 2's LoRA in a grid beside paper 1's)
    run_method_options: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    seeds: int = 1  # N > 1: the whole experiment once per seed 0..N-1 (seed_<s>/), then mean and sd per method
    device: str = "auto"  # every stage's train.device ("auto": cuda if available)
    workers: int = 1  # method runs (and the joint run) at a time, each in its own process: see mllm_cl.workers
    # Experiment config files run after this one, each into out_dir/<its name>, with this one's model (llm, vision,
    # projector, tokenizer, template, max_len), seeds, device and workers: a shared stage whose settings equal this
    # experiment's reuses its model (`make demo`: paper 2 after paper 1).
    then: list[str] = field(default_factory=list)
    # A finished experiment's folder: each shared stage reuses its model there when the settings are the same.
    shared_dir: str = ""

    def __post_init__(self) -> None:
        check_model_fields(self)
        check_device(self.device, "device")
        for run_name in self.methods:
            check_plain_name(run_name, "method run")


# ---------------------------------------------------------------- dataclass <-> dict, JSON and overrides

def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a plain dict, recursing into nested dataclasses; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """`value` checked against the field's type hint (ints become floats where a float is wanted); a value of
    the wrong type is a ConfigError naming the key, instead of a TypeError deep inside the run."""
    if hint is Any or isinstance(hint, TypeVar):
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object of {hint.__name__} settings, got {value!r}")
        return from_dict(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(arm, value, where)
            except ConfigError as e:
                errors.append(str(e).removeprefix(f"{where}: "))
        raise ConfigError(f"{where}: {' or '.join(errors)}{' or null' if type(None) in args else ''}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected a list of {len(args)} items, got {value!r}")
            items = list(args)
        else:
            items = [args[0] if args else Any] * len(value)
        return type(value)(_coerce(h, v, f"{where}[{i}]") for i, (h, v) in enumerate(zip(items, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        value_hint = args[1] if args else Any
        return {k: _coerce(value_hint, v, f"{where}.{k}") for k, v in value.items()}
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path (a string), got {value!r}")
        return Path(value)
    if hint in _SCALARS:
        is_int = isinstance(value, int) and not isinstance(value, bool)  # in Python, True is an int too
        if hint is float and is_int:
            return float(value)
        if not (is_int if hint is int else isinstance(value, hint)):
            raise ConfigError(f"{where}: expected {_SCALARS[hint]}, got {value!r}")
    return value


coerce_value = _coerce  # the same check for values outside a dataclass (a CL method's options)


def load_json(cls: type[T], path: str | Path) -> T:
    data = read_json(path, ConfigError)
    return from_dict(cls, data, str(path))


def parse_value(text: str) -> Any:
    """`1e-3` -> float, `true` -> True, `[a,b]` -> ["a", "b"], JSON where it parses, else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [parse_value(part.strip()) for part in inner.split(",")] if inner else []
    return text


def apply_overrides(config: T, overrides: list[str]) -> T:
    """Return a copy of `config` with `a.b.c=value` overrides applied; a wrong key names the known ones."""
    data = to_dict(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                known = sorted(node) if isinstance(node, dict) else []
                raise ConfigError(f"override {item!r}: no key {'.'.join(parts[:depth + 1])!r}; known: {known}")
            if depth == len(parts) - 1:
                node[part] = parse_value(text)
            else:
                node = node[part]
    return from_dict(type(config), data)

