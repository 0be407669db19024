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
import json
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Dataset facts live in the registry; re-exported here for the config's users.
from synqt.data.registry import CONFIG_DIR, VTAB_GROUPS, config_dir, dataset_config_path, list_datasets  # noqa: F401
from synqt.data.splits import LAYOUTS
from synqt.errors import ConfigError
from synqt.storage import atomic_write_text

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

OVERRIDE_SOURCE = "command line override"



MEMORY_MODES = ("keep", "kv_bf16", "recompute")  # synqt.model.stream uses this tuple


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, scope: str = "pack",
        hparam: bool = False, tag: str | None = None, label: str | None = None, min: float | None = None,
        max: float | None = None, choices: tuple[str, ...] | None = None, result: bool = True,
        path: bool = False) -> Any:
    """Declare one TrialConfig key; every key list of the project is derived from these declarations.

    scope: "branch" (may differ between the trials of one pack: the engine gives each branch its own value)
    or "pack" (must agree: the branches share batches and one frozen forward pass). hparam: recorded in a
    run's ``hparams``. tag: short name in run names (default: the name without underscores). label: name in
    the results table (default: the key). min / max: inclusive bounds; choices: the allowed strings.
    result: False for a key that cannot change a run's numbers (how often to log or checkpoint, the eval
    batch size, where decoded images are cached): the only keys a resume may change (synqt.weights.compat).
    path: a file or folder path (an override's ``~`` is refused: YAML's null or the shell's home folder?).
    """
    if scope not in ("branch", "pack"):
        raise ValueError(f"scope {scope!r}")
    meta = {"scope": scope, "hparam": hparam, "tag": tag, "label": label, "min": min, "max": max,
            "choices": choices, "result": result, "path": path}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


_SEED_MAX = 2**32 - 1


@dataclass
class TrialConfig:
    """Everything one trial needs; the table in docs/config.md documents each key."""

    # data
    dataset: str = setting("")
    data_root: str = setting("", path=True)
    group: str | None = setting(None, scope="branch", choices=VTAB_GROUPS)
    layout: str = setting("auto", choices=("auto", *LAYOUTS))  # the layouts are declared with their readers
    num_classes: int | None = setting(None, min=1)
    image_size: int | None = setting(None, min=1)
    interpolation: str = setting("bicubic", choices=("bicubic", "bilinear", "nearest", "lanczos"))
    mean: list[float] = setting(factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = setting(factory=lambda: list(IMAGENET_STD))
    cache_dir: str | None = setting(None, result=False, path=True)
    # model
    backbone: str = setting("vit_base_patch16_224")
    backbone_kwargs: dict[str, Any] = setting(factory=dict)
    checkpoint: str | None = setting(None, path=True)
    drop_path_rate: float = setting(0.1, tag="dpr", min=0, max=1.0)
    backbone_drop_path: bool = setting(True)
    token_nums: int = setting(1, scope="branch", hparam=True, tag="T", label="T", min=1)
    feat_scale: float = setting(1.0, scope="branch", hparam=True, tag="fs", label="s_feat")
    attn_scale: float = setting(1.0, scope="branch", hparam=True, tag="as", label="s_attn")
    ffn_scale: float = setting(1.0, scope="branch", hparam=True, tag="ffs", label="s_ffn")
    memory_mode: str = setting("keep", hparam=True, tag="mem", choices=MEMORY_MODES)
    branch_dropout: float = setting(0.1, scope="branch", hparam=True, tag="bdrop", min=0, max=1.0)
    branch_attn_dropout: float = setting(0.1, scope="branch", hparam=True, tag="badrop", min=0, max=1.0)
    head_drop_path: float = setting(0.3, scope="branch", hparam=True, tag="hdp", min=0, max=1.0)
    # frozen-stream K/V cache (synqt.training.kv_cache) and deferred test evaluation
    kv_cache: str = setting("auto", choices=("off", "memory", "disk", "auto"))
    kv_cache_dtype: str = setting("bf16", choices=("bf16", "fp32"))
    kv_cache_max_gb: float = setting(32.0, min=0)
    deferred_eval: bool = setting(True)
    # protocol and optimisation
    protocol: str = setting("paper", choices=("paper", "vtab"))
    stage: str = setting("final", choices=("search", "final"))
    epochs: int = setting(50, hparam=True, tag="ep", min=1)
    warmup_epochs: float = setting(10.0, scope="branch", hparam=True, tag="wu", min=0)
    lr: float = setting(1e-3, scope="branch", hparam=True, tag="lr", min=0)
    min_lr: float = setting(1e-6, scope="branch", tag="minlr", min=0)
    weight_decay: float = setting(1e-2, scope="branch", hparam=True, tag="wd", label="wd", min=0)
    batch_size: int = setting(64, hparam=True, tag="bs", min=1)
    eval_batch_size: int = setting(128, min=1, result=False)
    grad_accum_steps: int = setting(1, min=1)
    eval_every: int = setting(10, min=1)
    precision: str = setting("no", hparam=True, choices=("no", "bf16", "fp16"))
    seed: int = setting(42, scope="branch", min=0, max=_SEED_MAX)
    data_seed: int | None = setting(None, min=0, max=_SEED_MAX)  # pack scope through its effective value
    init_seed: int | None = setting(None, scope="branch", min=0, max=_SEED_MAX)
    checkpoint_every: int = setting(1, scope="branch", min=0, result=False)
    log_every: int = setting(10, min=1, result=False)
    # execution
    trainer: str = setting("accelerate", choices=("accelerate", "deepspeed"))
    num_devices: int = setting(1, min=1)
    deepspeed_config: str | None = setting(None, path=True)
    device: str = setting("auto", choices=("auto", "cpu", "cuda"))

    def __post_init__(self) -> None:
        # Direct construction (tests, engine) gets the same coercion and checks as a YAML file.
        source = "TrialConfig(...)"
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_value(f.name, getattr(self, f.name), source))
        _check_cross(config_to_dict(self), lambda key: source)


_FIELDS = {f.name: f for f in dataclasses.fields(TrialConfig)}
CONFIG_KEYS: tuple[str, ...] = tuple(_FIELDS)
_TYPES: dict[str, Any] = typing.get_type_hints(TrialConfig)

# Every list below is derived from the declarations above.
BRANCH_KEYS: frozenset[str] = frozenset(k for k, f in _FIELDS.items() if f.metadata["scope"] == "branch")
PACK_KEYS: tuple[str, ...] = tuple(k for k, f in _FIELDS.items() if f.metadata["scope"] == "pack")
HPARAM_KEYS: tuple[str, ...] = tuple(k for k, f in _FIELDS.items() if f.metadata["hparam"])
# keys that cannot change a run's numbers: the only ones a resume may change (synqt.weights.compat)
RESULT_NEUTRAL_KEYS: frozenset[str] = frozenset(k for k, f in _FIELDS.items() if not f.metadata["result"])
# Every key that can change a run's result: a trial's identity. The ONE list that the resume check
# (synqt.weights.compat.config_changes), the duplicate rule (synqt.run.rundir.trial_identity) and the table's rows
# (launcher.results.aggregate) compare; the backbone checkpoint is compared by content (synqt.run.rundir).
RESULT_KEYS: tuple[str, ...] = tuple(k for k in CONFIG_KEYS if k not in RESULT_NEUTRAL_KEYS)
TAGS: dict[str, str] = {k: f.metadata["tag"] or k.replace("_", "") for k, f in _FIELDS.items()}
LABELS: dict[str, str] = {k: f.metadata["label"] or k for k, f in _FIELDS.items()}
CHOICES: dict[str, tuple[str, ...]] = {k: f.metadata["choices"] for k, f in _FIELDS.items() if f.metadata["choices"]}
_MIN: dict[str, float] = {k: f.metadata["min"] for k, f in _FIELDS.items() if f.metadata["min"] is not None}
_MAX: dict[str, float] = {k: f.metadata["max"] for k, f in _FIELDS.items() if f.metadata["max"] is not None}


@dataclass(frozen=True)
class Schema:
    """The declared keys of a config dataclass (TrialConfig, launcher.plan.schema.Sweep): types from its annotations,
    choices and bounds from its ``setting(...)`` declarations. ``check`` is the one typed value check of the
    project (coercion, null, choices, bounds; errors name the source, key, value and what was expected)."""

    name: str
    keys: tuple[str, ...]
    types: Mapping[str, Any]
    choices: Mapping[str, tuple[str, ...]]
    mins: Mapping[str, float]
    maxs: Mapping[str, float]
    paths: frozenset[str] = frozenset()

    @classmethod
    def of(cls, dc: type) -> Schema:
        fields = {f.name: f for f in dataclasses.fields(dc) if not f.name.startswith("_")}
        meta = {k: f.metadata for k, f in fields.items()}
        hints = typing.get_type_hints(dc)
        return cls(dc.__name__, tuple(fields), {k: hints[k] for k in fields},
                   {k: m["choices"] for k, m in meta.items() if m.get("choices")},
                   {k: m["min"] for k, m in meta.items() if m.get("min") is not None},
                   {k: m["max"] for k, m in meta.items() if m.get("max") is not None},
                   frozenset(k for k, m in meta.items() if m.get("path")))

    def check(self, key: str, value: Any, source: str) -> Any:
        """``value`` coerced to the declared type of ``key`` and checked; ConfigError otherwise."""
        if key not in self.types:
            raise _unknown_key(key, source, self)
        return _check_value(key, value, source, self)


TRIAL = Schema.of(TrialConfig)


def pack_key(cfg: TrialConfig) -> str:
    """Trials with equal pack keys can be trained in lockstep over one frozen image stream: every PACK_KEYS
    value, with data_seed as its effective value (None -> seed)."""
    values = {k: _plain(getattr(cfg, k)) for k in PACK_KEYS}
    values["data_seed"] = effective_seeds(cfg)[0]
    return json.dumps(values, sort_keys=True, default=str)


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


def _expected(key: str, schema: Schema | None = None) -> str:
    schema = schema or TRIAL
    desc = _type_name(schema.types[key])
    if key in schema.choices:
        desc += " in {" + ", ".join(schema.choices[key]) + "}"
    return desc


def _type_error(key: str, value: Any, source: str, hint: str = "", schema: Schema | None = None) -> ConfigError:
    msg = f"{source}: key '{key}' has value {value!r} ({type(value).__name__}); expected {_expected(key, schema)}"
    return ConfigError(msg + (f" ({hint})" if hint else ""))


def _optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _as_float(key: str, value: Any, source: str, schema: Schema | None = None) -> float:
    if isinstance(value, bool):
        raise _type_error(key, value, source, schema=schema)
    out = None
    if isinstance(value, int | float):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            pass
    if out is None:
        raise _type_error(key, value, source, schema=schema)
    if not math.isfinite(out):
        raise _type_error(key, value, source, "must be finite", schema)
    return out


def _check_value(key: str, value: Any, source: str, schema: Schema | None = None) -> Any:
    """Coerce ``value`` to the declared type of ``key`` (in ``schema``, default TrialConfig's) and check its
    choices and bounds; return the clean value."""
    schema = schema or TRIAL
    base, optional = _optional(schema.types[key])
    if value is None or (
        optional and isinstance(value, str) and value.strip() in ("None", "none", "null", "~")
    ):
        if optional:
            return None
        raise _type_error(key, value, source, "this key cannot be null", schema)
    if base is bool:
        if not isinstance(value, bool):
            raise _type_error(key, value, source, "write true or false", schema)
        out: Any = value
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                raise _type_error(key, value, source, f"write {int(value)} without a decimal point", schema)
            raise _type_error(key, value, source, schema=schema)
        out = value
    elif base is float:
        out = _as_float(key, value, source, schema)
    elif base is str:
        if not isinstance(value, str):
            hint = "quote it" if isinstance(value, bool | int | float) else ""
            raise _type_error(key, value, source, hint, schema)
        out = value
    elif typing.get_origin(base) is list:
        if not isinstance(value, list | tuple):
            raise _type_error(key, value, source, schema=schema)
        out = [_as_float(key, v, source, schema) for v in value]
    elif typing.get_origin(base) is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _type_error(key, value, source, "a mapping with string keys", schema)
        out = dict(value)
    else:  # pragma: no cover - a new field type must be handled above
        raise TypeError(f"unhandled type for {key}: {base}")

    if key in schema.choices:
        if key == "group":
            out = {g.lower(): g for g in VTAB_GROUPS}.get(out.lower(), out)
        if out not in schema.choices[key]:
            raise ConfigError(
                f"{source}: key '{key}' has value {value!r}; expected one of {', '.join(schema.choices[key])}"
                + (" or null" if optional else "")
            )
    if key in ("mean", "std"):
        if len(out) != 3:
            raise ConfigError(f"{source}: key '{key}' has {len(out)} values {value!r}; expected 3 (R, G, B)")
        if key == "std" and any(v <= 0 for v in out):
            raise ConfigError(f"{source}: key 'std' has value {value!r}; every entry must be > 0")
    if key in schema.mins and out < schema.mins[key]:
        raise ConfigError(f"{source}: key '{key}' has value {value!r}; expected a value >= {schema.mins[key]:g}")
    below_one = ("drop_path_rate", "branch_dropout", "branch_attn_dropout", "head_drop_path")
    if key in schema.maxs and (out > schema.maxs[key] or (key in below_one and out >= 1.0)):
        bound = "< 1" if key in below_one else f"<= {schema.maxs[key]:g}"
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
    if values["kv_cache"] not in ("off", "auto") and values["backbone_drop_path"]:
        raise ConfigError(
            f"kv_cache={values['kv_cache']} (from {where('kv_cache')}) needs a deterministic image stream, but "
            f"backbone_drop_path=true (from {where('backbone_drop_path')}) draws stochastic depth on it every step: "
            "set backbone_drop_path: false, or kv_cache: off (or auto, which then runs live)"
        )
    if values["min_lr"] > values["lr"]:
        raise ConfigError(
            f"min_lr={values['min_lr']:g} (from {where('min_lr')}) exceeds lr={values['lr']:g} "
            f"(from {where('lr')}): the cosine would go up"
        )


def _unknown_key(key: str, source: str, schema: Schema | None = None) -> ConfigError:
    keys = (schema or TRIAL).keys
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(f"{source}: unknown key '{key}'.{hint} Allowed keys: {', '.join(keys)}")


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


_NULL_TEXT = ("", "None", "none", "null")
_YAML_MARKUP = (yaml.AnchorToken, yaml.AliasToken, yaml.TagToken)


def parse_override_value(key: str, raw: str, source: str = OVERRIDE_SOURCE, schema: Schema | None = None) -> Any:
    """An override's value: the ONE parser of ``key=value`` text (``synqt train``, ``synqt sweep``, ``synqt eval``).

    ``schema``: the keys ``key`` belongs to (default TrialConfig's; ``launcher.plan.schema.SWEEP`` for a sweep key).
    A text key (type ``str``, e.g. ``data_root``, ``storage_path``, ``name``, ``precision``) keeps the text as
    typed (surrounding blanks dropped): ``/data/run #2``, ``yes``, ``1e3``, ``null`` stay those strings. Other
    values are a YAML 1.2 scalar or flow list/mapping. ``None``/``none``/``null`` or empty text is null for an
    Optional key, and so is ``~`` except for a path key. Raises ConfigError naming the key where YAML would
    change the text: a path key's ``~`` (YAML's null, or the shell's home folder?), a list or mapping for a text
    key, a ``#`` comment that YAML would drop, or a YAML anchor, alias or tag.
    """
    schema = schema or TRIAL
    where = f"{source} {key}={raw}"
    text = raw.strip()
    top = key.partition(".")[0]
    if "." not in key and top in schema.types:
        tp = schema.types[top]
        optional = typing.get_origin(tp) in (types.UnionType, typing.Union) and type(None) in typing.get_args(tp)
        kinds = [a for a in typing.get_args(tp) if a is not type(None)] if optional else [tp]
        is_path = top in schema.paths
        if text == "~" and is_path:
            raise ConfigError(f"{where}: key '{top}' is a path and '~' is ambiguous (YAML's null, or your home "
                              "folder?): write null to unset it, or the full path")
        if optional and (text in _NULL_TEXT or text == "~"):
            return None
        if kinds == [str]:
            if text[:1] in ("[", "{"):
                raise ConfigError(f"{where}: key '{top}' takes one text value ({_expected(top, schema)}); "
                                  f"{text!r} reads as a YAML {'list' if text[0] == '[' else 'mapping'}")
            return text
    if not text:
        return None
    try:
        tokens = list(yaml.scan(text, Loader=_StrictLoader))
    except yaml.YAMLError:
        tokens = []  # yaml_load below raises with the position
    markup = [t for t in tokens if isinstance(t, _YAML_MARKUP)]
    if markup:
        raise ConfigError(f"{where}: key '{key}': YAML anchors, aliases and tags (&, *, !) are not override values; "
                          f"quote the text if it is one")
    ends = [t.end_mark.index for t in tokens if not isinstance(t, yaml.StreamEndToken)]
    if tokens and text[max(ends, default=0):].strip():
        raise ConfigError(f"{where}: key '{key}': YAML would read {text[max(ends, default=0):].strip()!r} as a "
                          f"comment and drop it; quote the value")
    return yaml_load(text, where)


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


SAVED_CONFIG_HEADER = "# Resolved synqt TrialConfig: every key, after defaults, base, dataset, files and overrides.\n"
# The last line of a saved config: a config.yaml that starts with the header but lacks it was cut short (a
# half-copied file still parses as YAML, with keys missing). Files written before this line existed lack both.
SAVED_CONFIG_END = "# end of the resolved config\n"


def save_config(cfg: TrialConfig, path: str | Path) -> Path:
    """Write the resolved config atomically; ``load_config([path], base=False)`` gives it back."""
    return atomic_write_text(path, SAVED_CONFIG_HEADER + dump_config(cfg) + SAVED_CONFIG_END)


def saved_config_problem(text: str) -> str | None:
    """None when ``text`` (a run's config.yaml) is a complete saved config; else what is wrong with it."""
    if not text.strip():
        return "an empty file"
    if text.startswith(SAVED_CONFIG_HEADER) and not text.endswith(SAVED_CONFIG_END):
        return f"cut short ({len(text.encode())} bytes, no closing line {SAVED_CONFIG_END.strip()!r})"
    return None


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


# VTAB-1k's splits: train800val200 is train800 + val200 (synqt.data derives the two from it when absent)
_SPLIT_PARTS = {"train800val200": {"train800", "val200"}, "train800": {"train800"}, "val200": {"val200"},
                "test": {"test"}}


def training_overlap(cfg: TrialConfig, split: str) -> str | None:
    """A warning when scoring ``split`` would score images the run with ``cfg`` trained on (else None).

    The paper protocol (and vtab's final stage) trains on train800val200, so its val200 and train800 accuracies
    are training accuracies; a search-stage run trained on train800.
    """
    train, _ = splits_for(cfg)
    if not _SPLIT_PARTS.get(split, {split}) & _SPLIT_PARTS.get(train, {train}):
        return None
    how = f"protocol={cfg.protocol}" + (f", stage={cfg.stage}" if cfg.protocol == "vtab" else "")
    return (f"split {split} holds images this run trained on ({how} trains on {train}): its accuracy is a "
            f"training accuracy, not a held-out one" + ("; score test for the result" if split != "test" else ""))


def effective_seeds(cfg: TrialConfig) -> tuple[int, int]:
    """(data_seed, init_seed), each falling back to ``seed``."""
    data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    init_seed = cfg.seed if cfg.init_seed is None else cfg.init_seed
    return data_seed, init_seed
