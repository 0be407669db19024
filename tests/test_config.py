"""TrialConfig: shipped configs, precedence, override parsing, strict errors, dataset lookup."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from synqt.config import (
    CONFIG_KEYS,
    VTAB_GROUPS,
    TrialConfig,
    apply_overrides,
    config_dir,
    config_from_dict,
    config_to_dict,
    dataset_config_path,
    effective_seeds,
    list_datasets,
    load_config,
    load_yaml_file,
    save_config,
    splits_for,
)
from synqt.errors import ConfigError

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Spec section 6, copied here so a wrong shipped YAML is caught against the source, not itself.
VTAB_TABLE = """
cifar Natural 100 4 0.1 1.0 0.1
caltech101 Natural 102 4 1.0 0.1 0.1
dtd Natural 47 1 0.1 0.1 0.1
oxford_flowers102 Natural 102 4 0.1 0.1 0.1
oxford_iiit_pet Natural 37 1 1.0 0.1 1.0
svhn Natural 10 4 1.0 0.1 1.0
sun397 Natural 397 1 0.1 1.0 0.1
patch_camelyon Specialized 2 16 0.1 0.1 1.0
eurosat Specialized 10 16 0.1 1.0 0.1
resisc45 Specialized 45 4 0.1 0.1 0.1
diabetic_retinopathy Specialized 5 16 0.1 1.0 0.1
clevr_count Structured 8 16 0.1 0.1 0.1
clevr_dist Structured 6 16 0.1 0.1 0.1
dmlab Structured 6 1 1.0 0.1 0.1
kitti Structured 4 16 0.1 1.0 0.1
dsprites_loc Structured 16 16 0.1 0.1 0.1
dsprites_ori Structured 16 4 1.0 0.1 0.1
smallnorb_azi Structured 18 16 1.0 0.1 1.0
smallnorb_ele Structured 9 16 0.1 1.0 0.1
"""
VTAB = {
    row.split()[0]: (row.split()[1], int(row.split()[2]), int(row.split()[3]), *map(float, row.split()[4:]))
    for row in VTAB_TABLE.strip().splitlines()
}
FGVC = {"cub": 200, "nabirds": 555, "oxford_flowers": 102, "stanford_dogs": 120, "stanford_cars": 196}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def tmp_configs(tmp_path, monkeypatch):
    """A private config dir: base.yaml and one dataset config, so precedence is tested in isolation."""
    root = tmp_path / "configs"
    write(root / "base.yaml", "epochs: 7\nwarmup_epochs: 1\nlr: 0.5\nweight_decay: 0.3\nseed: 1\n")
    write(
        root / "vtab" / "toy.yaml",
        "dataset: toy\ngroup: natural\nepochs: 8\nwarmup_epochs: 2\nlr: 0.25\nnum_classes: 3\n",
    )
    monkeypatch.setenv("SYNQT_CONFIG_DIR", str(root))
    return root


# ------------------------------------------------------------------------------------ shipped files


def test_config_dir_is_repo_configs():
    assert config_dir().resolve() == REPO_CONFIGS.resolve()


@pytest.mark.parametrize(
    "path", sorted(p for p in REPO_CONFIGS.rglob("*.yaml") if "sweeps" not in p.parts and p.name != "datasets.yaml"),
    ids=lambda p: p.name,
)
def test_every_shipped_trial_yaml_loads_strictly(path):
    cfg = config_from_dict(load_yaml_file(path), str(path))
    assert isinstance(cfg, TrialConfig)
    resolved = load_config([path])
    for key, value in load_yaml_file(path).items():
        assert getattr(resolved, key) == (value.capitalize() if key == "group" and value else value), key


def test_vtab_configs_match_spec_table():
    assert sorted(p.stem for p in (REPO_CONFIGS / "vtab").glob("*.yaml")) == sorted(VTAB)
    for name, (group, classes, tokens, feat, attn, ffn) in VTAB.items():
        cfg = load_config([], [f"dataset={name}"])
        got = (cfg.group, cfg.num_classes, cfg.token_nums, cfg.feat_scale, cfg.attn_scale, cfg.ffn_scale)
        assert got == (group, classes, tokens, feat, attn, ffn), name
        assert cfg.dataset == name and cfg.layout == "auto"
    assert load_config([], ["dataset=patch_camelyon"]).token_nums == 16
    assert load_config([], ["dataset=oxford_iiit_pet"]).ffn_scale == 1.0


def test_fgvc_configs():
    assert sorted(p.stem for p in (REPO_CONFIGS / "fgvc").glob("*.yaml")) == sorted(FGVC)
    for name, classes in FGVC.items():
        cfg = load_config([], [f"dataset={name}"])
        assert (cfg.layout, cfg.group, cfg.num_classes, cfg.token_nums) == ("fgvc_json", None, classes, 4)
        assert cfg.feat_scale == cfg.attn_scale == cfg.ffn_scale == 0.1
        assert "ships no FGVC settings" in dataset_config_path(name).read_text()


def test_base_is_official_recipe():
    cfg = load_config([], [])
    assert cfg.backbone == "vit_base_patch16_224"
    assert (cfg.drop_path_rate, cfg.backbone_drop_path) == (0.1, True)
    assert (cfg.epochs, cfg.warmup_epochs, cfg.lr, cfg.min_lr) == (50, 10.0, 1e-3, 1e-6)
    assert (cfg.weight_decay, cfg.batch_size, cfg.seed) == (1e-2, 64, 42)
    assert (cfg.protocol, cfg.eval_every, cfg.precision) == ("paper", 10, "no")
    assert cfg.interpolation == "bicubic"
    assert cfg.mean == [0.485, 0.456, 0.406] and cfg.std == [0.229, 0.224, 0.225]
    assert isinstance(cfg.lr, float) and isinstance(cfg.min_lr, float)


def test_demo_yaml_is_small_and_dataset_free():
    raw = load_yaml_file(REPO_CONFIGS / "demo.yaml")
    assert "dataset" not in raw and "data_root" not in raw
    cfg = load_config([REPO_CONFIGS / "demo.yaml"])
    assert cfg.backbone == "vit_tiny_patch16_224"
    kwargs = {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}
    assert cfg.backbone_kwargs == kwargs
    # CPU-sized: a few hundred steps at most, evaluations that land on the last epoch
    assert cfg.epochs <= 30 and cfg.batch_size <= 64 and cfg.epochs % cfg.eval_every == 0
    assert cfg.warmup_epochs < cfg.epochs
    # the demo sweep trains with the same recipe as this file
    sweep = load_yaml_file(REPO_CONFIGS / "sweeps" / "demo.yaml")
    for key in ("backbone", "backbone_kwargs", "epochs", "warmup_epochs", "batch_size", "eval_every", "token_nums",
                "feat_scale", "attn_scale", "ffn_scale"):
        assert sweep["trial"][key] == getattr(cfg, key), key
    assert cfg.lr in sweep["grid"]["lr"]


def test_deepspeed_zero2_json():
    import json

    ds = json.loads((REPO_CONFIGS / "deepspeed" / "zero2.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is False and "optimizer" not in ds and "scheduler" not in ds
    assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["gradient_accumulation_steps"] == "auto"
    assert "_comment" in ds


def test_list_datasets_groups_and_benchmarks():
    assert len(list_datasets()) == 24
    natural, specialized, structured = (list_datasets(g) for g in ("natural", "SPECIALIZED", "Structured"))
    assert (len(natural), len(specialized), len(structured)) == (7, 4, 8)
    assert natural[0] == "cifar" and structured[-1] == "smallnorb_ele"  # spec order, not alphabetical
    assert list_datasets(benchmark="vtab1k") == natural + specialized + structured
    assert list_datasets(benchmark="fgvc") == list(FGVC)  # cub, nabirds, oxford_flowers, dogs, cars
    assert list_datasets("natural", benchmark="fgvc") == []
    assert VTAB_GROUPS == ("Natural", "Specialized", "Structured")
    with pytest.raises(ConfigError, match="unknown group 'nature'"):
        list_datasets("nature")
    with pytest.raises(ConfigError, match="unknown benchmark 'imagenet'"):
        list_datasets(benchmark="imagenet")


def test_dataset_config_path():
    # the repo-root configs/ is a link to the shipped synqt/configs/
    assert dataset_config_path("cifar").resolve() == (REPO_CONFIGS / "vtab" / "cifar.yaml").resolve()
    assert dataset_config_path("cub").resolve() == (REPO_CONFIGS / "fgvc" / "cub.yaml").resolve()
    assert dataset_config_path("no_such_set") is None
    assert dataset_config_path("../base") is None
    assert dataset_config_path("") is None


# ---------------------------------------------------------------------------------------- precedence


def test_precedence_defaults_base_dataset_user_override(tmp_configs, tmp_path):
    user1 = write(tmp_path / "u1.yaml", "dataset: toy\nlr: 0.125\nbatch_size: 16\n")
    user2 = write(tmp_path / "u2.yaml", "batch_size: 8\nmin_lr: 0.01\n")
    cfg = load_config([user1, user2], ["min_lr=0.02"])
    assert cfg.eval_every == 10  # dataclass default (nobody sets it)
    assert cfg.weight_decay == 0.3  # base.yaml beats the default
    assert cfg.epochs == 8 and cfg.num_classes == 3  # dataset yaml beats base
    assert cfg.group == "Natural"  # normalised capitalisation
    assert cfg.lr == 0.125  # user file beats the dataset yaml
    assert cfg.batch_size == 8  # later user file beats earlier
    assert cfg.min_lr == 0.02  # override beats user files
    assert load_config([user1], ["lr=0.0625", "epochs=9"]).lr == 0.0625


def test_dataset_yaml_found_from_override_or_user_file(tmp_configs, tmp_path):
    assert load_config([], ["dataset=toy"]).num_classes == 3
    assert load_config([write(tmp_path / "u.yaml", "dataset: toy\n")], []).num_classes == 3
    # The last layer naming a dataset decides which shipped YAML is used.
    assert load_config([write(tmp_path / "v.yaml", "dataset: toy\n")], ["dataset=other"]).num_classes is None
    # A dataset without a shipped config is fine.
    cfg = load_config([], ["dataset=my_own_set"])
    assert (cfg.dataset, cfg.epochs, cfg.lr) == ("my_own_set", 7, 0.5)


def test_base_false_skips_base(tmp_configs):
    assert load_config([], [], base=False).epochs == 50
    assert load_config([], ["dataset=toy"], base=False).epochs == 8


def test_real_precedence_with_shipped_dataset(tmp_path):
    user = write(tmp_path / "u.yaml", "token_nums: 2\nattn_scale: 0.5\n")
    cfg = load_config([user], ["dataset=cifar", "attn_scale=0.25"])
    assert (cfg.token_nums, cfg.attn_scale, cfg.feat_scale, cfg.num_classes) == (2, 0.25, 0.1, 100)


# ----------------------------------------------------------------------------------- value parsing


def test_override_scalars_are_coerced_to_declared_types():
    cfg = load_config([], ["lr=1e-3", "epochs=5", "warmup_epochs=1", "min_lr=0", "precision=no"])
    assert cfg.lr == 0.001 and type(cfg.lr) is float
    assert cfg.epochs == 5 and type(cfg.epochs) is int
    assert cfg.warmup_epochs == 1.0 and type(cfg.warmup_epochs) is float  # int accepted for float
    assert cfg.min_lr == 0.0 and type(cfg.min_lr) is float
    assert cfg.precision == "no"  # not YAML 1.1's False


def test_yaml_file_scientific_notation_and_no(tmp_path):
    user = write(tmp_path / "u.yaml", "lr: 1e-3\nmin_lr: 5E-7\nprecision: no\n")
    cfg = load_config([user])
    assert (cfg.lr, cfg.min_lr, cfg.precision) == (1e-3, 5e-7, "no")


def test_bools_are_strict(tmp_path):
    assert load_config([], ["backbone_drop_path=false"]).backbone_drop_path is False
    assert load_config([], ["backbone_drop_path=True"]).backbone_drop_path is True
    for bad in ("yes", "1", "0", "off"):
        with pytest.raises(ConfigError, match="backbone_drop_path.*expected bool"):
            load_config([], [f"backbone_drop_path={bad}"])
    with pytest.raises(ConfigError, match="expected bool"):
        load_config([write(tmp_path / "b.yaml", "backbone_drop_path: yes\n")])


def test_null_for_optional_fields_only():
    cfg = load_config([], ["checkpoint=/w/vit.npz", "data_seed=7"])
    assert cfg.checkpoint == "/w/vit.npz" and effective_seeds(cfg) == (7, 42)
    for null in ("None", "null"):
        assert apply_overrides(cfg, [f"checkpoint={null}", f"data_seed={null}"]).checkpoint is None
    assert apply_overrides(cfg, ["data_seed=~"]).data_seed is None
    with pytest.raises(ConfigError, match="'checkpoint' is a path and '~' is ambiguous"):
        apply_overrides(cfg, ["checkpoint=~"])  # YAML's null, or the home folder (issue 20)
    assert apply_overrides(cfg, ["data_seed=None"]).data_seed is None
    assert load_config([], ["group=None"]).group is None
    with pytest.raises(ConfigError, match="'epochs'.*cannot be null"):
        load_config([], ["epochs=null"])


def test_list_and_nested_dict_overrides(tmp_path):
    cfg = load_config([], ["mean=[0.5,0.5,0.5]", "std=[1, 1, 1]"])
    assert cfg.mean == [0.5, 0.5, 0.5] and cfg.std == [1.0, 1.0, 1.0] and type(cfg.std[0]) is float
    user = write(tmp_path / "u.yaml", "backbone_kwargs:\n  img_size: 64\n  depth: 2\n")
    cfg = load_config([user], ["backbone_kwargs.img_size=32", "backbone_kwargs.num_heads=3"])
    assert cfg.backbone_kwargs == {"img_size": 32, "depth": 2, "num_heads": 3}
    cfg = load_config([user], ["backbone_kwargs={patch_size: 4}"])  # a whole mapping replaces
    assert cfg.backbone_kwargs == {"patch_size": 4}
    with pytest.raises(ConfigError, match="expected 3"):
        load_config([], ["mean=[0.5,0.5]"])
    with pytest.raises(ConfigError, match="'lr' is a float, not a mapping"):
        load_config([], ["lr.x=1"])


def test_enumerated_values_and_ranges():
    assert load_config([], ["memory_mode=kv_bf16", "protocol=vtab", "stage=search"]).memory_mode == "kv_bf16"
    with pytest.raises(ConfigError, match=r"memory_mode.*'fast'.*keep, kv_bf16, recompute"):
        load_config([], ["memory_mode=fast"])
    with pytest.raises(ConfigError, match="group.*'Natrual'"):
        load_config([], ["group=Natrual"])
    with pytest.raises(ConfigError, match="token_nums.*>= 1"):
        load_config([], ["token_nums=0"])
    with pytest.raises(ConfigError, match="grad_accum_steps=3 .*command line.* must divide batch_size=64"):
        load_config([], ["grad_accum_steps=3"])
    assert load_config([], ["grad_accum_steps=4"]).grad_accum_steps == 4
    with pytest.raises(ConfigError, match="num_devices=3"):
        load_config([], ["trainer=deepspeed", "num_devices=3"])
    assert load_config([], ["trainer=deepspeed", "num_devices=4", "grad_accum_steps=2"]).num_devices == 4
    with pytest.raises(ConfigError, match="warmup_epochs=60 .* exceeds epochs=50"):
        load_config([], ["warmup_epochs=60"])


# ---------------------------------------------------------------------------------------- errors


def test_unknown_key_in_file_names_key_file_and_allowed(tmp_path):
    bad = write(tmp_path / "typo.yaml", "lr: 0.1\ntoken_num: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config([bad])
    msg = str(err.value)
    assert "'token_num'" in msg and str(bad) in msg
    assert "Did you mean: token_nums" in msg and "Allowed keys:" in msg and "warmup_epochs" in msg


def test_unknown_override_names_command_line():
    with pytest.raises(
        ConfigError, match=r"command line override: unknown key 'epoch'.*Did you mean: epochs"
    ):
        load_config([], ["epoch=5"])
    with pytest.raises(ConfigError, match="command line.*'epochs' is not key=value"):
        load_config([], ["epochs"])


def test_wrong_type_message_names_key_file_value_type(tmp_path):
    bad = write(tmp_path / "t.yaml", "epochs: fifty\n")
    with pytest.raises(ConfigError) as err:
        load_config([bad])
    msg = str(err.value)
    assert str(bad) in msg and "'epochs'" in msg and "'fifty'" in msg and "expected int" in msg
    expected = r"command line override: key 'lr' has value 'abc' \(str\); expected float"
    with pytest.raises(ConfigError, match=expected):
        load_config([], ["lr=abc"])
    with pytest.raises(ConfigError, match="write 5 without a decimal point"):
        load_config([], ["epochs=5.0"])
    with pytest.raises(ConfigError, match="'dataset'.*expected str"):
        config_from_dict({"dataset": 3}, "d")


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config([tmp_path / "missing.yaml"])
    lst = write(tmp_path / "list.yaml", "- lr: 1\n")
    with pytest.raises(ConfigError, match=f"{lst}: expected a mapping"):
        load_config([lst])
    broken = write(tmp_path / "broken.yaml", "lr: [1, 2\n")
    with pytest.raises(ConfigError, match=f"{broken}: invalid YAML"):
        load_config([broken])
    dup = write(tmp_path / "dup.yaml", "lr: 0.1\nlr: 0.2\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        load_config([dup])
    assert load_config([write(tmp_path / "empty.yaml", "# nothing\n")]).epochs == 50


def test_direct_construction_is_checked():
    assert TrialConfig(lr=1).lr == 1.0 and type(TrialConfig(lr=1).lr) is float
    with pytest.raises(ConfigError, match="layout"):
        TrialConfig(layout="folders")


# ----------------------------------------------------------------------------- round trip, helpers


def test_save_config_round_trip(tmp_path):
    cfg = load_config(
        [REPO_CONFIGS / "demo.yaml"],
        ["dataset=dtd", "data_root=/d", "checkpoint=/w/x.npz", "init_seed=3", "precision=bf16", "group=null"],
    )
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
    again = load_config([out], base=False)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    assert list(config_to_dict(cfg)) == list(CONFIG_KEYS)
    assert config_from_dict(config_to_dict(cfg), "round trip") == cfg
    assert load_config([out]) == cfg  # with base and dataset layers underneath: the run repeats exactly


def test_apply_overrides_returns_new_object():
    cfg = load_config([], ["dataset=cifar"])
    new = apply_overrides(cfg, ["lr=2e-3", "backbone_kwargs.img_size=32"])
    assert (new.lr, new.backbone_kwargs) == (2e-3, {"img_size": 32})
    assert (cfg.lr, cfg.backbone_kwargs) == (1e-3, {})
    assert dataclasses.replace(new, lr=1e-3, backbone_kwargs={}) == cfg


def test_splits_and_seeds():
    cfg = TrialConfig()
    assert splits_for(cfg) == ("train800val200", "test")
    assert splits_for(TrialConfig(protocol="paper", stage="search")) == ("train800val200", "test")
    assert splits_for(TrialConfig(protocol="vtab", stage="search")) == ("train800", "val200")
    assert splits_for(TrialConfig(protocol="vtab", stage="final")) == ("train800val200", "test")
    assert effective_seeds(TrialConfig(seed=5)) == (5, 5)
    assert effective_seeds(TrialConfig(seed=5, data_seed=1, init_seed=2)) == (1, 2)
