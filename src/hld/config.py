"""Run configuration: nested dataclasses, one per component, a help text on every field.

A config comes from YAML (a path, or the name of a preset shipped in `hld/configs/`) plus dotted
overrides (`train.lr=3e-4`). Unknown keys, wrong types and contradictory values are `HldError`s.
The resolved config is written, with each field's help as a comment, into every run directory.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from hld.config_checks import HIDDEN_LOSSES, STUDENT_FAMILIES, validate
from hld.distill.divergences.registry import help_text as divergence_help
from hld.errors import HldError
from hld.files import MAX_CONFIG_BYTES, read_text, regular_file

PRESET_DIR = Path(__file__).parent / "configs"

if typing.TYPE_CHECKING:
    HiddenLossName = str
    StudentFamily = str
else:  # the names hld.distill.hidden_losses registers (config_checks.HIDDEN_LOSSES), checked like any Literal
    HiddenLossName = Literal[tuple(HIDDEN_LOSSES)]
    StudentFamily = Literal[tuple(STUDENT_FAMILIES)]  # hld.models.student.FAMILIES builds each


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class DataConfig:
    train: str = _f(
        "sample:train",
        "training text: 'sample:train', a C4 shard glob "
        "(c4-train.*.json.gz), a .jsonl/.jsonl.gz/.txt path or glob, or 'hf:allenai/c4:en:train'",
    )
    validation: str = _f("sample:validation", "validation text, same forms as `train`")
    text_field: str = _f("text", "JSON field holding the document text (JSONL and C4 sources)")
    seq_len: int = _f(128, "tokens per packed window (input length); each window gives seq_len-1 targets")
    max_train_docs: Optional[int] = _f(None, "read at most this many training documents (None: all)")
    val_tokens: int = _f(32768, "validation tokens used for periodic val/ppl (whole windows, from the start)")
    store_dir: Optional[str] = _f(
        None,
        "directory of token stores: `hld tokenize` writes there and runs read there (each source tokenised "
        "once, memory-mapped); None: $HLD_CACHE_DIR/stores",
    )


@dataclass
class TeacherConfig:
    model: str = _f("gemma-3-270m", "teacher: HF id, local HF dir, .gguf file, run dir, or 'gemma-3-270m'")
    dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "auto", "teacher weights dtype; auto = bfloat16 on CUDA or CPUs with native bf16, else float32"
    )
    cache: Optional[str] = _f(
        None,
        "read teacher signals from this offline cache (hld cache-teacher) "
        "instead of running the teacher; KD then uses the cache's top-k logits (or sampled ids)",
    )
    cache_top_k: int = _f(64, "top-k logits stored per token when building a cache")
    cache_codec: Literal["exact", "compact"] = _f(
        "compact",
        "how a cache built now stores its top-k: compact = ids delta-coded and bit-packed, log-probs "
        "relative to the top-1 in cache_value_bits bits (about 2.4 bytes per kept entry at k=64, |dKD| below "
        "1e-3 nats/token: docs/cache-format.md); exact = float16 logits + int32 ids (6 bytes per entry)",
    )
    cache_value_bits: int = _f(6, "compact codec: bits per top-k log-prob (2-8)")
    cache_signal: Literal["topk", "sampled"] = _f(
        "topk",
        "the logit signal a cache built now stores: topk = the teacher's top cache_top_k logits + the mass off "
        "them; sampled = cache_samples ids drawn per token from the teacher (Random-Sampling KD, arXiv "
        "2503.16870) with importance weights: the KD gradient is unbiased (docs/cache-format.md)",
    )
    cache_samples: int = _f(64, "sampled signal: draws per token (the unique ids drawn are stored, at most this many)")
    cache_proposal_temperature: float = _f(
        1.0,
        "sampled signal: ids are drawn from q = softmax(teacher logits / tau) and weighted by p/q (tau = 1: q = p, "
        "weights = draw counts / cache_samples); tau > 1 spreads the draws over more ids; tau < 1 rarely draws "
        "the tail, whose weights then vary wildly",
    )
    cache_hidden_dtype: Literal["bfloat16", "fp8"] = _f(
        "fp8",
        "how a cache built now stores hidden states: fp8 = e4m3 with a per-token scale (d + 4 bytes per "
        "token and layer, hidden loss within 1%), bfloat16 = 2d bytes",
    )


@dataclass
class StudentInitConfig:
    """How a student derived from its teacher (`student.preset=depth-N`) is made (src/hld/models/derive.py;
    docs/decisions.md, "Students derived from the teacher"). `blocks` under a scratch preset is refused."""

    rank: Literal["block_influence", "angular", "loss_drop"] = _f(
        "block_influence",
        "how depth-N keeps N of the teacher's blocks when `blocks` is empty: block_influence = the N blocks that "
        "change their input most, 1 - mean cos(input, output) (ShortGPT, arXiv 2403.03853); angular = drop the "
        "contiguous run of blocks whose input and output are closest in angle (Gromov et al., arXiv 2403.17887); "
        "loss_drop = the N blocks whose removal alone raises the teacher's loss most (one teacher forward per block)",
    )
    blocks: list = _f(
        [],
        "the teacher's blocks to keep, 0-based indices into its decoder layers in increasing order, e.g. "
        "[0, 1, 2, 3, 4, 5, 15, 16, 17] (as many as depth-N says); empty: ranked by `rank`",
    )
    calibration_windows: int = _f(
        16,
        "training windows the ranking reads (the first of the training store, the same for every seed and arm); "
        "their teacher forwards are counted in the run's FLOPs, in both accountings",
    )
    residual: Literal["prune", "project"] = _f(
        "prune",
        "how a depth-N student narrower than its teacher's residual stream (student.d_model) gets its embedding "
        "and every weight that reads or writes the residual (src/hld/models/residual_width.py): prune = keep the "
        "student.d_model channels with the largest activation importance on the calibration windows (Minitron, "
        "arXiv 2407.14679); project = map the teacher's weights onto the top student.d_model principal directions "
        "of its residual states there (PCA; a Low-Rank Clone style init, arXiv 2505.12781), which also applies at "
        "the teacher's own width when student.d_model is not set (a rotated teacher)",
    )


@dataclass
class StudentConfig:
    family: StudentFamily = _f(
        "gemma3",
        "decoder family the student is built as: "
        + "; ".join(f"{k} = {v}" for k, v in STUDENT_FAMILIES.items())
        + " (a depth-N student is its teacher's family: another value is refused there)",
    )
    preset: str = _f(
        "tiny-2l",
        "size preset (see `hld.models.student.PRESETS`), or depth-N: N of the teacher's own blocks, with its "
        "embedding, final norm and head (an ordinary model of the teacher's family; `student.init`)",
    )
    n_layers: Optional[int] = _f(None, "override the preset's number of decoder blocks")
    d_model: Optional[int] = _f(
        None,
        "override the preset's hidden width; under depth-N the residual width the teacher's is narrowed to "
        "(student.init.residual)",
    )
    n_heads: Optional[int] = _f(None, "override the preset's attention heads")
    n_kv_heads: Optional[int] = _f(None, "override the preset's key/value heads")
    head_dim: Optional[int] = _f(None, "override the preset's per-head width")
    d_ff: Optional[int] = _f(None, "override the preset's MLP width")
    init: StudentInitConfig = field(
        default_factory=StudentInitConfig, metadata={"help": "a student derived from its teacher (depth-N)"}
    )
    tokenizer: Optional[str] = _f(
        None,
        "the student's own tokenizer (a teacher with another tokenizer, docs/cross-tokenizer.md): an HF id or a "
        "local directory holding tokenizer.json (e.g. one `hld train-tokenizer` wrote); the student's vocabulary "
        "is its size, the training text is paired by `hld tokenize --student-tokenizer`, and kd / hld-* use the "
        "cross-tokenizer losses (objective.cross_tokenizer). None: the teacher's tokenizer",
    )


@dataclass
class ScheduleConfig:
    """A loss weight over the run, as a function of progress p = step / (steps - 1) in [0, 1]
    (the first step gets the configured weight w0, the last step `final`); src/hld/train/schedule.py."""

    kind: Literal["constant", "linear", "cosine", "wsd"] = _f(
        "constant",
        "constant: w0 throughout; linear: w0 -> final; cosine: w0 -> final along a half cosine; "
        "wsd: 0 -> w0 over warmup_share, w0, then linearly -> final over the last decay_share",
    )
    final: float = _f(0.0, "the weight at the last step (linear, cosine, wsd)")
    warmup_share: float = _f(0.0, "wsd: share of the run spent warming the weight up from 0")
    decay_share: float = _f(0.2, "wsd: share of the run spent decaying the weight to `final`")


@dataclass
class HiddenConfig:
    mapping: Literal["uniform", "last", "explicit", "kept"] = _f(
        "uniform",
        "student->teacher layer pairs: uniform spacing, last block only, `pairs`, or kept (a depth-N student: "
        "each block to the teacher block it was copied from, matched without a trained projector: the identity, or "
        "the fixed basis of a narrowed or projected residual, student.init.residual)",
    )
    n_pairs: Optional[int] = _f(None, "uniform: number of pairs (None: one per student block)")
    pairs: list = _f([], "explicit: [[student_layer, teacher_layer], ...]; layer i = output of block i, 0 = embeddings")
    loss: HiddenLossName = _f(
        "mse",
        "hidden loss: "
        + "; ".join(f"{k} = {v}" for k, v in HIDDEN_LOSSES.items())
        + " (src/hld/distill/hidden_losses/)",
    )
    normalize_teacher: Literal["none", "rms", "standardize"] = _f(
        "standardize",
        "teacher targets: standardize = per-dimension (x - mean) / std, statistics estimated once "
        "on the first `stats_windows` training windows and frozen (RUN_DIR/hidden_stats.pt); rms = divide each "
        "vector by its RMS; none = raw states",
    )
    skip_first_position: bool = _f(
        True,
        "leave position 0 of every window (the BOS, an attention sink) out of "
        "the hidden loss, the standardisation statistics and the layer diagnostics",
    )
    stats_windows: int = _f(
        64, "standardize: training windows (the run's first, in batch order) the teacher statistics are estimated on"
    )
    beta: float = _f(1.0, "weight of the hidden loss (hld-joint: added to KD; hld-first: the phase-1 loss)")
    beta_schedule: ScheduleConfig = field(
        default_factory=ScheduleConfig, metadata={"help": "hld-joint: beta over the run (w0 = beta)"}
    )
    first_share: float = _f(0.2, "hld-first: share of the token budget spent in the hidden-only phase")
    diagnostics: bool = _f(
        True,
        "at every validation: linear CKA per mapped pair (val/cka/...) and the "
        "projector's R^2 (val/r2/...); at the end the student x teacher CKA matrix (cka.json)",
    )
    diagnostics_windows: int = _f(16, "validation windows the layer diagnostics are computed on")


@dataclass
class CrossTokenizerConfig:
    """The losses kd and hld-* use when the student has its own tokenizer (`student.tokenizer`); read nowhere
    else. src/hld/distill/cross_tok/ derives each; docs/decisions.md, "A teacher with another tokenizer"."""

    loss: Literal["uld", "alm", "gold"] = _f(
        "gold",
        "the logit loss across tokenizers, over the chunks both sides spell alike: gold = exact KD over the "
        "shared vocabulary where a chunk is one token on each side, uld elsewhere (the best of the three in the "
        "cross-tok study: docs/cross-tokenizer.md); uld = Universal Logit Distillation, the sorted-probability "
        "distance between the two next-token distributions (arXiv 2402.12030); alm = Approximate Likelihood "
        "Matching of each chunk's likelihood (arXiv 2503.20083)",
    )
    uld_top_k: Optional[int] = _f(
        64, "uld and gold's uld part: each side's k largest probabilities and the rest as one (None: whole rows)"
    )
    alm_temperature: float = _f(100.0, "alm: the binarisation temperature tau (chunk likelihoods p^(1/tau))")
    gold_uld_weight: float = _f(1.0, "gold: the weight of its uld part beside the exact KD part")
    pooling: Literal["last", "mean"] = _f(
        "last",
        "hld-*: each aligned chunk's hidden state on both sides: last = the state at its last token (both sides "
        "have read the same text), mean = the mean over its tokens",
    )


@dataclass
class ObjectiveConfig:
    method: Literal["ce", "kd", "hld-joint", "hld-first"] = _f("kd", "training objective / arm")
    alpha: float = _f(0.5, "KD weight: loss = alpha*T^2*D(teacher_T, student_T) + (1-alpha)*CE")
    alpha_schedule: ScheduleConfig = field(
        default_factory=ScheduleConfig, metadata={"help": "KD weight over the run (w0 = alpha)"}
    )
    temperature: float = _f(1.0, "softmax temperature T of both distributions in the KD term")
    divergence: str = _f("forward_kl", divergence_help())
    top_k: Optional[int] = _f(
        None,
        "truncate the teacher to its top-k logits (None: full vocabulary; a cache "
        "always holds its top-k); see top_k_rest for the mass off them",
    )
    top_k_rest: Literal["bucket", "renormalize"] = _f(
        "bucket",
        "a top-k teacher's mass off its k ids: bucket = one extra outcome, matched by the student's mass "
        "off them (exact; every divergence finite; = the dense loss at k = V); renormalize = dropped, the teacher "
        "renormalised over its k ids (reverse_kl then infinite)",
    )
    hidden: HiddenConfig = field(default_factory=HiddenConfig, metadata={"help": "hidden-layer loss"})
    cross_tokenizer: CrossTokenizerConfig = field(
        default_factory=CrossTokenizerConfig,
        metadata={"help": "the losses of a student with its own tokenizer (student.tokenizer)"},
    )


@dataclass
class BudgetConfig:
    tokens: Optional[int] = _f(
        None,
        "training tokens (input positions) per run; steps = tokens / "
        "(batch_size*seq_len). Give tokens or flops, not both (neither: 65536 tokens)",
    )
    flops: Optional[float] = _f(
        None,
        "training FLOPs per run (docs/compute.md); steps are derived from the "
        "arm's FLOPs per token, so at equal FLOPs CE sees more tokens than KD/HLD",
    )
    count_teacher: bool = _f(True, "charge the teacher's forward FLOPs to the tokens it provides signals for")


@dataclass
class TrainConfig:
    seed: int = _f(0, "seed for init and batch order (batch order is identical for every arm)")
    batch_size: int = _f(16, "sequences per optimiser step (global)")
    micro_batch_size: Optional[int] = _f(None, "sequences per forward/backward (None: batch_size)")
    lr: float = _f(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = _f(0.1, "final learning rate as a share of `lr`")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay (matrices only; norms and biases: 0)")
    betas: list = _f([0.9, 0.95], "AdamW betas")
    schedule: Literal["cosine", "wsd", "constant"] = _f(
        "cosine", "learning rate after warmup: cosine decay, warmup-stable-decay, or constant"
    )
    warmup_share: float = _f(0.05, "share of steps spent in linear warmup")
    decay_share: float = _f(0.2, "wsd: share of steps spent in the final linear decay")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    precision: Literal["auto", "float32", "bfloat16"] = _f(
        "auto", "student compute: bf16 autocast or fp32; auto = bf16 on CUDA/native-bf16 CPUs, else fp32"
    )
    freeze_embedding: bool = _f(
        False,
        "keep the student's token embedding, and the head tied to it, fixed (a derived student: the teacher's): "
        "no gradient and no optimiser state for it; the head's backward skips dL/dW, counted in FLOPs (the head "
        "costs 2x its forward instead of 3x)",
    )
    keep_final_checkpoint: bool = _f(
        True,
        "keep checkpoints/ once the run has exported its student and written summary.json (false: the last "
        "checkpoint is not written and any earlier one is removed; a finished run is never resumed, and a "
        "derived Gemma 3 270M student's checkpoint is over 1 GB)",
    )
    loss_chunk_tokens: int = _f(256, "tokens per chunk of the fused head+loss (memory ~ 4 buffers of chunk*vocab*4 B)")
    compile: bool = _f(False, "torch.compile the student's blocks (pays on GPUs; compiling takes a while on CPU)")
    eval_every_steps: int = _f(0, "validate every N steps (0: only at the end)")
    log_every_steps: int = _f(1, "write a train line to metrics.jsonl every N steps")
    checkpoint_every_steps: int = _f(0, "save a checkpoint every N steps (0: only at the end)")
    dist_timeout_minutes: int = _f(
        60,
        "torchrun: how long a process waits for the others at a collective; covers the one-off work rank 0 "
        "does first (tokenising a local corpus into its store, converting a GGUF teacher)",
    )
    memory_check: bool = _f(
        True,
        "hld train: refuse, before allocating, a run whose `hld plan` memory estimate exceeds this machine's "
        "memory (the GPU's on a GPU, else RAM, per process); false: start anyway (the estimate can be high)",
    )
    parallel: Literal["auto", "none", "ddp", "fsdp2"] = _f(
        "auto",
        "data parallelism under torchrun: ddp (replicated student, gradients summed over processes), "
        "fsdp2 (fully_shard per decoder block, then the root; DCP checkpoints), none (one process only); "
        "auto = ddp when torchrun starts more than one process, else none. batch_size is global",
    )


@dataclass
class LogConfig:
    tensorboard: bool = _f(
        False,
        "also write TensorBoard event files to RUN_DIR/tensorboard/ "
        "(metrics.jsonl is always written; needs pip install 'hld[tensorboard]')",
    )
    wandb: bool = _f(
        False,
        "also log to Weights & Biases (files in RUN_DIR/wandb/; WANDB_MODE=offline "
        "needs no network or account; needs pip install 'hld[wandb]')",
    )
    wandb_project: str = _f("hld", "W&B project the run is logged to")


@dataclass
class RunConfig:
    name: str = _f("run", "run name (used in tables)")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "text sources and packing"})
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata={"help": "frozen teacher"})
    student: StudentConfig = field(default_factory=StudentConfig, metadata={"help": "student size"})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig, metadata={"help": "arm and losses"})
    budget: BudgetConfig = field(default_factory=BudgetConfig, metadata={"help": "run length"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "optimisation"})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "metric sinks besides metrics.jsonl"})


# --------------------------------------------------------------------------- building from dicts


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


class _Override:
    """A command-line override value: parsed as YAML, but kept verbatim for string fields
    (`data.text_field=yes` means the string "yes", not YAML's boolean)."""

    def __init__(self, raw: str) -> None:
        self.raw = raw
        try:
            self.parsed = yaml.safe_load(raw)
        except yaml.YAMLError:
            self.parsed = raw


def _wants_str(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints are accepted where floats are)."""
    if isinstance(value, _Override):
        wants_raw = _wants_str(tp) and value.parsed is not None and not isinstance(value.parsed, str)
        value = value.raw if wants_raw else value.parsed
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise HldError(
                f"config {where}={value!r} is not one of {list(choices)}",
                f"set {where} to one of {', '.join(map(str, choices))}",
            )
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, _Override):
            value = value.parsed
        if not isinstance(value, dict):
            raise HldError(f"config {where} must be a mapping, got {value!r}", f"write {where}: as a section")
        return _build(tp, value, where + ".")  # type: ignore[arg-type]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 3e-4 as a string
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `name: 123` in YAML
    if tp is list and isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise HldError(
        f"config {where}={value!r} should be of type {_type_name(tp)}", f"give {where} a {_type_name(tp)} value"
    )


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            close = [n for n in names if n.startswith(str(key)[:3])]
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise HldError(
                f"unknown config key {prefix}{key}{hint}",
                f"valid keys under {prefix or 'the top level'}: {', '.join(sorted(names))}",
            )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise HldError(f"override {item!r} is not of the form key=value", "write e.g. train.lr=3e-4")
        key, text = item.split("=", 1)
        if not key.strip() or any(not part.strip() for part in key.split(".")):
            raise HldError(f"override {item!r} has no key before '='", "write e.g. train.lr=3e-4")
        node = raw
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            section = ".".join(parts[: i + 1])
            if not isinstance(node, dict) and (isinstance(node, _Override) or not _is_section(section)):
                raise HldError(f"override {key!r} goes through a non-section value", "check the key path")
            if not isinstance(node, dict):  # a section the config file gave another value: the file is wrong
                raise HldError(
                    f"the config sets {section} to {node!r}, which is not a section (so {key} cannot be set)",
                    f"write {section}: as a section of key: value pairs in the config file",
                )
        node[parts[-1]] = _Override(text)
    return raw


def _is_section(dotted: str) -> bool:
    """Is `dotted` (e.g. `objective.hidden`) a section of the run config (a nested dataclass)?"""
    cls: Any = RunConfig
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls) or part not in {f.name for f in dataclasses.fields(cls)}:
            return False
        cls = typing.get_type_hints(cls).get(part)
    return dataclasses.is_dataclass(cls)


def resolve_config_path(name_or_path: str, directory: Path = PRESET_DIR, kind: str = "config") -> Path:
    """A YAML path, or the name of a file shipped in `directory`."""
    path = Path(name_or_path)
    fix = "give a YAML file (a config is never read from a device, FIFO or directory)"
    if os.path.lexists(path) and not path.is_dir():  # a file, or what is refused as one (FIFO, device, dangling)
        regular_file(path, kind, fix)
        return path
    preset = directory / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset  # a directory of the preset's name in the working directory does not hide it
    if path.is_dir():
        regular_file(path, kind, fix)
    names = sorted(p.stem for p in directory.glob("*.yaml"))
    raise HldError(
        f"{kind} {name_or_path!r} is neither a file nor a shipped one",
        f"give a YAML path or one of: {', '.join(names)}",
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key written twice in one mapping is an error (YAML would keep the last one
    silently: `lr: 1e-3` above a forgotten `lr: 3e-4` would train with the second)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # the base class refuses it with its own error
            if key in seen:
                raise _DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, again: int) -> None:
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


def read_yaml(path: Path) -> dict:
    """A config or study YAML: a regular file of at most `MAX_CONFIG_BYTES` holding a mapping with at least
    one key (an empty file ran as all defaults: a config that says nothing is refused)."""
    try:
        raw = yaml.load(
            read_text(path, "config", "give a YAML file of key: value pairs", max_bytes=MAX_CONFIG_BYTES),
            Loader=_UniqueKeyLoader,
        )
    except (OSError, UnicodeDecodeError) as exc:
        raise HldError(f"cannot read config {path}: {exc}", "check the path and that it is UTF-8 text") from exc
    except _DuplicateKey as exc:
        raise HldError(
            f"config {path} sets {exc.key!r} twice in one section (lines {exc.first} and {exc.again})",
            "keep one of them (YAML would silently use the last)",
        ) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise HldError(f"config {path} is not valid YAML{at}", "fix the YAML syntax") from exc
    if raw is None or raw == {}:
        raise HldError(
            f"config {path} is empty (it sets no key: it would run as every default)",
            "write the keys it should set (hld config lists them), or give a preset: "
            + ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))),
        )
    if not isinstance(raw, dict):
        raise HldError(f"config {path} must be a mapping at the top level", "write key: value pairs")
    return raw


def load_config(
    name_or_path: Optional[str] = None, overrides: Optional[list[str]] = None, base: Optional[dict] = None
) -> RunConfig:
    raw = dict(base or {})
    if name_or_path is not None:
        raw = _merge(raw, read_yaml(resolve_config_path(name_or_path)))
    raw = apply_overrides(raw, list(overrides or []))
    cfg = _build(RunConfig, migrate(raw))
    validate(cfg)
    return cfg


def migrate(raw: dict) -> dict:
    """A config of an earlier release in today's keys, so its run directories stay readable (`hld report`,
    `hld export`): `objective.jsd_beta` (dropped when divergences took their parameters) becomes the
    parameter of `objective.divergence=jsd(beta=...)`, and is dropped for any other divergence."""
    o = raw.get("objective")
    if not isinstance(o, dict) or "jsd_beta" not in o:
        return raw
    o = dict(o)
    beta, div = (v.parsed if isinstance(v, _Override) else v for v in (o.pop("jsd_beta"), o.get("divergence")))
    if div == "jsd" and beta is not None:
        o["divergence"] = f"jsd(beta={beta})"
    return {**raw, "objective": o}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# what `--resume` may change, nothing a run computes: where metric lines also go (the `log` section), and
# whether `hld train` checks the memory estimate before it starts (a run refused on resume can go on)
RESUME_MAY_CHANGE = ("log", "train.memory_check")


# keys added since runs were first written, each with the default that computes what a run without it
# computed: a run's config.yaml that lacks one and a config that holds it at this default are the same run
# (same resume comparison, same checkpoint identity)
ADDED_AT_DEFAULT = ("student.tokenizer", "objective.cross_tokenizer")


def _without(tree: dict, dotted: str, keep=lambda value: False) -> dict:
    """`tree` without the key `dotted` (a copy along its path), unless `keep(value)`."""
    section, _, rest = dotted.partition(".")
    if section not in tree:
        return tree
    if not rest:
        return tree if keep(tree[section]) else {k: v for k, v in tree.items() if k != section}
    if not isinstance(tree[section], dict):
        return tree
    return {**tree, section: _without(tree[section], rest, keep)}


def resume_view(resolved: dict) -> dict:
    """A resolved config (`to_dict`, or a run's config.yaml) without the sections and keys a resume may
    change, nor the keys of `ADDED_AT_DEFAULT` where they hold their default: what `--resume` compares with
    the run's config.yaml, and what a checkpoint's identity hashes."""
    out = resolved
    for dotted in RESUME_MAY_CHANGE:
        out = _without(out, dotted)
    defaults = to_dict(RunConfig())
    for dotted in ADDED_AT_DEFAULT:
        default = functools.reduce(lambda node, part: node[part], dotted.split("."), defaults)
        out = _without(out, dotted, keep=lambda value, default=default: value != default)
    return out


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML, each field preceded by its help text as a comment."""
    lines: list[str] = []

    def walk(obj: Any, indent: int) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            pad = "  " * indent
            lines.append(f"{pad}# {f.metadata.get('help', '')}")
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:")
                walk(value, indent + 1)
            else:
                text = yaml.safe_dump({f.name: value}, default_flow_style=True, width=1000).strip()
                lines.append(pad + text[1:-1] if text.startswith("{") else pad + text)

    walk(cfg, 0)
    return "\n".join(lines) + "\n"


def field_help(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every leaf field: the source of the comments in each run's config.yaml."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += field_help(type(default), prefix + f.name + ".")
        else:
            out.append((prefix + f.name, f.metadata.get("help", ""), default))
    return out
