"""One strict, typed trial config (modelled on torchtune): a dataclass, YAML layers and key=value overrides.

Every key has a declared type; a misspelt key, a wrong type or an unknown enumerated value is a
``ConfigError`` naming the file (or "command line override"), the key, the value and what was
expected, so a typo never silently trains the wrong thing on a cluster.

Precedence (lowest first): dataclass defaults < ``configs/base.yaml`` < the dataset's shipped YAML
(``configs/vtab/<dataset>.yaml`` or ``configs/fgvc/<dataset>.yaml``, when one exists) < user YAML
files in order < ``key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from synqt.errors import ConfigError
from synqt.fileio import atomic_write_text
from synqt.resources import shipped_config_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

VTAB_GROUPS = ("Natural", "Specialized", "Structured")

# Spec section 6 order (Natural, Specialized, Structured): used to order list_datasets() output.
VTAB1K_DATASETS = (
    "cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",
    "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",
    "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
    "smallnorb_azi", "smallnorb_ele",
)  # fmt: skip
FGVC_DATASETS = ("cub", "nabirds", "oxford_flowers", "stanford_dogs", "stanford_cars")

BENCHMARK_DIRS = {"vtab1k": "vtab", "fgvc": "fgvc"}
_BENCHMARK_ALIASES = {"vtab1k": "vtab1k", "vtab-1k": "vtab1k", "vtab": "vtab1k", "fgvc": "fgvc"}

OVERRIDE_SOURCE = "command line override"

# The shipped configs live inside the package (synqt/configs, found through importlib.resources) so that a
# wheel install finds them; the repository root links configs -> synqt/configs.
CONFIG_DIR = Path(os.environ.get("SYNQT_CONFIG_DIR") or shipped_config_dir())


@dataclass
class TrialConfig:
    """Everything one trial needs; the table in docs/config.md documents each key."""

    # data
    dataset: str = ""
    data_root: str = ""
    group: str | None = None
    layout: str = "auto"
    num_classes: int | None = None
    image_size: int | None = None
    interpolation: str = "bicubic"
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    cache_dir: str | None = None
    # model
    backbone: str = "vit_base_patch16_224"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    drop_path_rate: float = 0.1
    backbone_drop_path: bool = True
    token_nums: int = 1
    feat_scale: float = 1.0
    attn_scale: float = 1.0
    ffn_scale: float = 1.0
    memory_mode: str = "keep"
    # protocol and optimisation
    protocol: str = "paper"
    stage: str = "final"
    epochs: int = 50
    warmup_epochs: float = 10.0
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 1e-2
    batch_size: int = 64
    eval_batch_size: int = 128
    grad_accum_steps: int = 1
    eval_every: int = 10
    precision: str = "no"
    seed: int = 42
    data_seed: int | None = None
    init_seed: int | None = None
    checkpoint_every: int = 1
    log_every: int = 10
    # execution
    trainer: str = "accelerate"
    num_devices: int = 1
    deepspeed_config: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        # Direct construction (tests, engine) gets the same coercion and checks as a YAML file.
        source = "TrialConfig(...)"
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_value(f.name, getattr(self, f.name), source))
        _check_cross(config_to_dict(self), lambda key: source)


CONFIG_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrialConfig))
_TYPES: dict[str, Any] = typing.get_type_hints(TrialConfig)

# Enumerated values. group is normalised to the capitalisation of VTAB_GROUPS.
CHOICES: dict[str, tuple[str, ...]] = {
    "layout": ("auto", "vtab_json", "vtab_txt", "fgvc_json"),
    "interpolation": ("bicubic", "bilinear", "nearest", "lanczos"),
    "memory_mode": ("keep", "kv_bf16", "recompute"),
    "protocol": ("paper", "vtab"),
    "stage": ("search", "final"),
    "precision": ("no", "bf16", "fp16"),
    "trainer": ("accelerate", "deepspeed"),
    "device": ("auto", "cpu", "cuda"),
    "group": VTAB_GROUPS,
}
# Lower bounds (inclusive) for numeric keys where a wrong sign is a certain mistake.
_MIN: dict[str, float] = {
    "epochs": 1, "batch_size": 1, "eval_batch_size": 1, "grad_accum_steps": 1, "token_nums": 1,
    "eval_every": 1, "log_every": 1, "num_devices": 1, "checkpoint_every": 0, "num_classes": 1,
    "image_size": 1, "warmup_epochs": 0, "lr": 0, "min_lr": 0, "weight_decay": 0,
    "drop_path_rate": 0, "seed": 0, "data_seed": 0, "init_seed": 0,
}  # fmt: skip
_MAX: dict[str, float] = {
    "drop_path_rate": 1.0,
    "seed": 2**32 - 1,
    "data_seed": 2**32 - 1,
    "init_seed": 2**32 - 1,
}


# --------------------------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and floats, and duplicate keys refused.

    YAML 1.1 reads ``1e-3`` as a string and ``no`` as False (so ``precision: no`` would break);
    YAML 1.2 reads them as 0.001 and "no", which is what a person writing a config means.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_StrictLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str, source: str = "<string>") -> Any:
    """Parse YAML text with the strict loader (safe tags only); errors name ``source``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader derives from SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None


def load_yaml_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    data = yaml_load(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at top level, got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"{path}: key {key!r} is a {type(key).__name__}; keys must be strings")
    return data


# ----------------------------------------------------------------------------------- value checks


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _expected(key: str) -> str:
    desc = _type_name(_TYPES[key])
    if key in CHOICES:
        desc += " in {" + ", ".join(CHOICES[key]) + "}"
    return desc


def _type_error(key: str, value: Any, source: str, hint: str = "") -> ConfigError:
    msg = f"{source}: key '{key}' has value {value!r} ({type(value).__name__}); expected {_expected(key)}"
    return ConfigError(msg + (f" ({hint})" if hint else ""))


def _optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _as_float(key: str, value: Any, source: str) -> float:
    if isinstance(value, bool):
        raise _type_error(key, value, source)
    out = None
    if isinstance(value, int | float):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            pass
    if out is None:
        raise _type_error(key, value, source)
    if not math.isfinite(out):
        raise _type_error(key, value, source, "must be finite")
    return out


def _check_value(key: str, value: Any, source: str) -> Any:
    """Coerce ``value`` to the declared type of ``key`` and check its range; return the clean value."""
    base, optional = _optional(_TYPES[key])
    if value is None or (
        optional and isinstance(value, str) and value.strip() in ("None", "none", "null", "~")
    ):
        if optional:
            return None
        raise _type_error(key, value, source, "this key cannot be null")
    if base is bool:
        if not isinstance(value, bool):
            raise _type_error(key, value, source, "write true or false")
        out: Any = value
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                raise _type_error(key, value, source, f"write {int(value)} without a decimal point")
            raise _type_error(key, value, source)
        out = value
    elif base is float:
        out = _as_float(key, value, source)
    elif base is str:
        if not isinstance(value, str):
            hint = "quote it" if isinstance(value, bool | int | float) else ""
            raise _type_error(key, value, source, hint)
        out = value
    elif typing.get_origin(base) is list:
        if not isinstance(value, list | tuple):
            raise _type_error(key, value, source)
        out = [_as_float(key, v, source) for v in value]
    elif typing.get_origin(base) is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _type_error(key, value, source, "a mapping with string keys")
        out = dict(value)
    else:  # pragma: no cover - a new field type must be handled above
        raise TypeError(f"unhandled type for {key}: {base}")

    if key in CHOICES:
        if key == "group":
            out = {g.lower(): g for g in VTAB_GROUPS}.get(out.lower(), out)
        if out not in CHOICES[key]:
            raise ConfigError(
                f"{source}: key '{key}' has value {value!r}; expected one of {', '.join(CHOICES[key])}"
                + (" or null" if optional else "")
            )
    if key in ("mean", "std"):
        if len(out) != 3:
            raise ConfigError(f"{source}: key '{key}' has {len(out)} values {value!r}; expected 3 (R, G, B)")
        if key == "std" and any(v <= 0 for v in out):
            raise ConfigError(f"{source}: key 'std' has value {value!r}; every entry must be > 0")
    if key in _MIN and out < _MIN[key]:
        raise ConfigError(f"{source}: key '{key}' has value {value!r}; expected a value >= {_MIN[key]:g}")
    if key in _MAX and (out > _MAX[key] or (key == "drop_path_rate" and out >= 1.0)):
        bound = "< 1" if key == "drop_path_rate" else f"<= {_MAX[key]:g}"
        raise ConfigError(f"{source}: key '{key}' has value {value!r}; expected a value {bound}")
    return out


def _check_cross(values: Mapping[str, Any], where: typing.Callable[[str], str]) -> None:
    """Checks that involve two keys; ``where(key)`` names the layer that set the key."""
    bs, ga = values["batch_size"], values["grad_accum_steps"]
    if bs % ga:
        raise ConfigError(
            f"grad_accum_steps={ga} (from {where('grad_accum_steps')}) must divide "
            f"batch_size={bs} (from {where('batch_size')}): the micro-batch is batch_size / grad_accum_steps"
        )
    if values["trainer"] == "deepspeed" and bs % (ga * values["num_devices"]):
        raise ConfigError(
            f"batch_size={bs} (from {where('batch_size')}) is not divisible by grad_accum_steps={ga} x "
            f"num_devices={values['num_devices']} (from {where('num_devices')}): each DeepSpeed process "
            "needs a whole micro-batch"
        )
    ep, wu = values["epochs"], values["warmup_epochs"]
    if wu > ep:
        raise ConfigError(
            f"warmup_epochs={wu:g} (from {where('warmup_epochs')}) exceeds "
            f"epochs={ep} (from {where('epochs')})"
        )
    if values["min_lr"] > values["lr"]:
        raise ConfigError(
            f"min_lr={values['min_lr']:g} (from {where('min_lr')}) exceeds lr={values['lr']:g} "
            f"(from {where('lr')}): the cosine would go up"
        )


def _unknown_key(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, CONFIG_KEYS, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(f"{source}: unknown key '{key}'.{hint} Allowed keys: {', '.join(CONFIG_KEYS)}")


# --------------------------------------------------------------------------------------- layering


def _set(values: dict[str, Any], key: str, value: Any, source: str) -> str:
    """Set ``key`` (possibly ``dictkey.sub``) in ``values`` after checking it; return the top key."""
    top, dot, sub = key.partition(".")
    if top not in _TYPES:
        raise _unknown_key(key if not dot else top, source)
    if dot:
        if typing.get_origin(_optional(_TYPES[top])[0]) is not dict:
            raise ConfigError(
                f"{source}: key '{key}': '{top}' is a {_expected(top)}, not a mapping, so it has no sub-keys"
            )
        if not sub or any(not part for part in sub.split(".")):
            raise ConfigError(f"{source}: key '{key}' has an empty part after '{top}.'")
        nested = dict(values[top])
        cursor = nested
        parts = sub.split(".")
        for part in parts[:-1]:
            child = cursor.get(part)
            cursor[part] = dict(child) if isinstance(child, Mapping) else {}
            cursor = cursor[part]
        cursor[parts[-1]] = value
        values[top] = _check_value(top, nested, source)
    else:
        values[top] = _check_value(top, value, source)
    return top


def split_override(text: str, source: str = OVERRIDE_SOURCE) -> tuple[str, str]:
    """``"key=value"`` -> ``("key", "value")``; the value is still raw text."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(
            f"{source}: {text!r} is not key=value (e.g. lr=1e-3 or backbone_kwargs.img_size=32)"
        )
    return key, raw


def parse_override_value(key: str, raw: str, source: str = OVERRIDE_SOURCE) -> Any:
    """Parse an override's text as a YAML scalar or flow list/mapping.

    String-typed keys keep the raw text (so ``precision=no`` and ``dataset=2024`` stay strings);
    ``null``/``None``/empty text means null for the Optional ones.
    """
    top = key.partition(".")[0]
    if "." not in key and top in _TYPES:
        base, optional = _optional(_TYPES[top])
        stripped = raw.strip()
        if optional and stripped in ("", "None", "none", "null", "~"):
            return None
        if base is str:
            return stripped
    if not raw.strip():
        return None
    return yaml_load(raw, f"{source} {key}={raw}")


def _apply_mapping(values: dict, data: Mapping[str, Any], source: str, origin: dict[str, str]) -> None:
    for key, value in data.items():
        origin[_set(values, key, value, source)] = source


def _apply_override_list(values: dict, overrides: Iterable[str], source: str, origin: dict[str, str]) -> None:
    for text in overrides:
        key, raw = split_override(text, source)
        origin[_set(values, key, parse_override_value(key, raw, source), source)] = source


def _defaults() -> dict[str, Any]:
    return {
        f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
        for f in dataclasses.fields(TrialConfig)
    }


def _finish(values: dict[str, Any], origin: Mapping[str, str], fallback: str = "the default") -> TrialConfig:
    _check_cross(values, lambda key: origin.get(key, fallback))
    return TrialConfig(**values)


def config_dir() -> Path:
    """``$SYNQT_CONFIG_DIR`` if set, else ``CONFIG_DIR`` (the shipped ``synqt/configs``); read at call time."""
    env = os.environ.get("SYNQT_CONFIG_DIR")
    return Path(env) if env else Path(CONFIG_DIR)


def dataset_config_path(name: str) -> Path | None:
    """The shipped ``vtab/<name>.yaml`` or ``fgvc/<name>.yaml``, or None when the dataset has none."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    root = config_dir()
    for sub in BENCHMARK_DIRS.values():
        path = root / sub / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def load_config(
    paths: Iterable[str | Path] = (), overrides: Iterable[str] = (), *, base: bool = True
) -> TrialConfig:
    """Resolve a TrialConfig: defaults < base.yaml < dataset YAML < ``paths`` in order < ``overrides``.

    The dataset's shipped YAML is chosen by the ``dataset`` the later layers end up naming, so
    ``dataset=cifar`` on the command line brings in cifar's token_nums and scales, which the
    user's own files and overrides can still change.
    """
    # A lone string is one path / one override, not a sequence of characters.
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    layers: list[tuple[str, dict[str, Any]]] = []
    if base:
        base_path = config_dir() / "base.yaml"
        layers.append((str(base_path), load_yaml_file(base_path)))
    user = [(str(p), load_yaml_file(p)) for p in paths]

    # Check every layer on its own first, so an error names the layer; this also tells us the dataset.
    probe, origin = _defaults(), {}
    for source, data in layers + user:
        _apply_mapping(probe, data, source, origin)
    _apply_override_list(probe, overrides, OVERRIDE_SOURCE, origin)

    ds_path = dataset_config_path(probe["dataset"])
    if ds_path is not None:
        layers.append((str(ds_path), load_yaml_file(ds_path)))

    values, origin = _defaults(), {}
    for source, data in layers + user:
        _apply_mapping(values, data, source, origin)
    _apply_override_list(values, overrides, OVERRIDE_SOURCE, origin)
    return _finish(values, origin)


def config_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> TrialConfig:
    """Build a TrialConfig from a mapping over the dataclass defaults (no base or dataset layer)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping of key: value, got {type(d).__name__}")
    values, origin = _defaults(), {}
    _apply_mapping(values, d, source, origin)
    return _finish(values, origin)


def config_to_dict(cfg: TrialConfig) -> dict[str, Any]:
    """Plain, YAML-able dict of every key (lists and dicts copied)."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def dump_config(cfg: TrialConfig) -> str:
    """The resolved config as YAML text, keys in declaration order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: TrialConfig, path: str | Path) -> Path:
    """Write the resolved config atomically; ``load_config([path], base=False)`` gives it back."""
    header = "# Resolved synqt TrialConfig: every key, after defaults, base, dataset, files and overrides.\n"
    return atomic_write_text(path, header + dump_config(cfg))


def apply_overrides(cfg: TrialConfig, overrides: Iterable[str], source: str = OVERRIDE_SOURCE) -> TrialConfig:
    """A new TrialConfig with ``key=value`` overrides applied.

    Unlike load_config this does not pull in a dataset's shipped YAML when ``dataset=`` changes:
    to resolve a trial for another dataset, call load_config with the override instead.
    """
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    values = config_to_dict(cfg)
    origin: dict[str, str] = {}
    _apply_override_list(values, overrides, source, origin)
    return _finish(values, origin, "the config being overridden")


def splits_for(cfg: TrialConfig) -> tuple[str, str]:
    """(train_split, eval_split) per DESIGN.md.

    paper -> (train800val200, test), stage ignored; vtab + search -> (train800, val200);
    vtab + final -> (train800val200, test).
    """
    if cfg.protocol == "paper" or cfg.stage == "final":
        return "train800val200", "test"
    return "train800", "val200"


def effective_seeds(cfg: TrialConfig) -> tuple[int, int]:
    """(data_seed, init_seed), each falling back to ``seed``."""
    data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    init_seed = cfg.seed if cfg.init_seed is None else cfg.init_seed
    return data_seed, init_seed


def list_datasets(group: str | None = None, benchmark: str | None = None) -> list[str]:
    """Names of the datasets with a shipped config, VTAB first in spec order, then FGVC.

    ``group``: natural / specialized / structured (any case; only VTAB datasets have one);
    ``benchmark``: vtab1k or fgvc.
    """
    if benchmark is not None:
        if benchmark.lower() not in _BENCHMARK_ALIASES:
            raise ConfigError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARK_DIRS)}")
        benchmarks = [_BENCHMARK_ALIASES[benchmark.lower()]]
    else:
        benchmarks = list(BENCHMARK_DIRS)
    want_group = None
    if group is not None:
        want_group = {g.lower(): g for g in VTAB_GROUPS}.get(group.lower())
        if want_group is None:
            raise ConfigError(f"unknown group {group!r}; expected one of {', '.join(VTAB_GROUPS)} (any case)")

    out: list[str] = []
    for bench in benchmarks:
        order = VTAB1K_DATASETS if bench == "vtab1k" else FGVC_DATASETS
        folder = config_dir() / BENCHMARK_DIRS[bench]
        names = [p.stem for p in folder.glob("*.yaml")] if folder.is_dir() else []
        names.sort(key=lambda n: (order.index(n) if n in order else len(order), n))
        for name in names:
            if want_group is not None:
                g = load_yaml_file(folder / f"{name}.yaml").get("group")
                if not isinstance(g, str) or g.lower() != want_group.lower():
                    continue
            out.append(name)
    return out
