"""Issue 20, kinds 2-4: what is typed on a sweep line is what runs and what is recorded.

2. every `key=value` on a sweep line is applied, or refused (exit 2) naming the key and the sweep key owning it;
3. a grid value wins over every fixed layer (sweep keys, `trial`, `per_dataset`), and each run records what it
   trained with; a key set in two places that would silently replace each other is refused;
4. one override parser for `synqt train` and `synqt sweep`: text keys keep the text as typed; what YAML would
   turn into something else is refused naming the key.
Expected values come from the sweep file read with plain PyYAML, the typed text, and hashlib.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from engine_helpers import (  # noqa: F401 - _one_thread_no_progress is an autouse fixture
    TASK,
    TINY_BACKBONE,
    TINY_KW,
    _one_thread_no_progress,
    read_json,
    write_tiny_assets,
)

from launcher.cli import main
from launcher.plan.schema import load_sweep
from launcher.plan.trials import plan_trials
from synqt.config import load_config
from synqt.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "sweeps" / "demo.yaml"
CI = REPO / "configs" / "sweeps" / "ci.yaml"


def _write(tmp_path: Path, data: dict, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _dry_run_json(capsys, *args: str) -> dict:
    assert main(["sweep", *args, "--dry-run", "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------------------------- kind 2


def test_seed_on_the_sweep_line_is_planned(capsys, tmp_path):
    demo = yaml.safe_load(DEMO.read_text())
    lrs = demo["grid"]["lr"]
    plan = _dry_run_json(capsys, "demo", "seed=7", f"storage_path={tmp_path}")
    names = [t["run_name"] for t in plan["trials"]]
    from synqt.data.synthetic import DEMO_TASKS

    assert sorted(names) == sorted(f"final-{d}-lr{lr:g}-s7" for d in DEMO_TASKS for lr in lrs)
    assert plan["seeds"] == [7] and all(t["seed"] == 7 for t in plan["trials"])


def test_a_key_the_grid_varies_and_dataset_on_the_line_are_applied(tmp_path):
    s = load_sweep(DEMO, ["lr=0.5", "dataset=syn_lesion", f"storage_path={tmp_path}"])
    trials = plan_trials(s)
    assert [t.run_name for t in trials] == ["final-syn_lesion-lr0.5-s42"]
    assert trials[0].config.lr == 0.5 and trials[0].hparams["lr"] == 0.5 and trials[0].config.dataset == "syn_lesion"


def test_a_trial_key_on_the_line_beats_per_dataset(tmp_path):
    data = {"name": "p", "datasets": ["syn_count", "syn_blobs"], "storage_path": str(tmp_path),
            "per_dataset": {"syn_count": {"epochs": 3, "warmup_epochs": 1}}}
    s = load_sweep(_write(tmp_path, data), ["epochs=4", "warmup_epochs=1"])
    assert {t.dataset: t.config.epochs for t in plan_trials(s)} == {"syn_count": 4, "syn_blobs": 4}


@pytest.mark.parametrize(("override", "needles"), [
    ("stage=search", ["'stage'", "protocol"]),
    ("seed=[42]", ["'seed'", "[42]", "expected int"]),
    ("seed=x", ["'seed'", "expected int"]),
    ("dataset=[a,b]", ["'dataset'", "list"]),
    ("trial.seed=3", ["trial.seed", "seeds"]),
    ("trial.dataset=syn_count", ["trial.dataset", "datasets"]),
    ("trial.protocol=vtab", ["trial.protocol", "protocol"]),
    ("per_dataset.syn_lesion.seed=3", ["per_dataset.syn_lesion.seed", "seeds"]),
    ("lr=fast", ["'lr'", "fast"]),
])
def test_an_override_the_sweep_cannot_apply_exits_2_naming_key_and_owner(override, needles, capsys, tmp_path):
    assert main(["sweep", "demo", override, f"storage_path={tmp_path}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


def test_two_overrides_of_one_sweep_key_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="seeds"):
        load_sweep(DEMO, ["seed=7", "seeds=[1,2]", f"storage_path={tmp_path}"])


def test_keys_owned_by_resources_devices_are_refused_in_any_layer(tmp_path):
    base = {"name": "d", "datasets": ["syn_count"], "storage_path": str(tmp_path), "resources": {"devices": 2}}
    for extra, needle in ((({"trial": {"trainer": "accelerate"}}), "trial.trainer"),
                          ({"grid": {"num_devices": [1, 2]}}, "grid.num_devices"),
                          ({"per_dataset": {"syn_count": {"num_devices": 4}}}, "per_dataset.syn_count.num_devices")):
        with pytest.raises(ConfigError, match="resources.devices") as err:
            load_sweep(_write(tmp_path, {**base, **extra}))
        assert needle in str(err.value)


# ----------------------------------------------------------------------------------------------- kind 3


@pytest.fixture(scope="module")
def two_backbones(tmp_path_factory):
    """Tiny data and two different tiny backbone files (A: the helpers' file, B: other random weights)."""
    import timm
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("backbones")
    data_root, a = write_tiny_assets(root)
    b = root / "other_backbone.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(999)
        model = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=0, **TINY_KW)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(b))
    return data_root, a, b


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_grid_over_the_checkpoint_trains_each_on_its_own(two_backbones, tmp_path):
    data_root, a, b = two_backbones
    assert _sha(a) != _sha(b)
    sweep = {"name": "bb", "datasets": [TASK], "protocol": "paper", "seeds": [42], "storage_path": str(tmp_path),
             "data_root": str(data_root), "checkpoint": str(a), "pack": "off",
             "trial": {"backbone": TINY_BACKBONE, "backbone_kwargs": dict(TINY_KW), "epochs": 1,
                       "warmup_epochs": 1, "batch_size": 16, "eval_every": 1, "device": "cpu", "kv_cache": "off",
                       "cache_dir": str(tmp_path / "cache")}}
    path = _write(tmp_path, sweep)
    code = main(["sweep", str(path), f"grid.checkpoint=[{a},{b}]", "--sequential"])
    assert code == 0
    runs = sorted((tmp_path / "bb" / "runs").iterdir())
    assert len(runs) == 2
    seen = set()
    for run in runs:
        metrics = read_json(run / "metrics.json")
        ckpt = Path(metrics["hparams"]["checkpoint"])
        assert ckpt in (a, b)
        # what it trained with (the weights' hash, from the trainer), what it says (config, hparams, name)
        assert metrics["provenance"]["backbone_checkpoint_sha256"] == _sha(ckpt)
        assert yaml.safe_load((run / "config.yaml").read_text())["checkpoint"] == str(ckpt)
        assert metrics["config"]["checkpoint"] == str(ckpt)
        assert ckpt.stem.replace("_", "") in run.name
        seen.add(ckpt)
    assert seen == {a, b}


def test_grid_beats_every_fixed_layer_and_per_dataset_beats_the_sweep_key(tmp_path):
    a, b, c = (str(tmp_path / n) for n in ("a.pth", "b.pth", "c.pth"))
    base = {"name": "g", "datasets": ["syn_count", "syn_blobs"], "storage_path": str(tmp_path), "checkpoint": a,
            "data_root": "/d/top"}
    s = load_sweep(_write(tmp_path, {**base, "per_dataset": {"syn_blobs": {"checkpoint": c,
                                                                              "data_root": "/d/blobs"}}}))
    cfg = {t.dataset: t.config for t in plan_trials(s)}
    assert cfg["syn_count"].checkpoint == a and cfg["syn_blobs"].checkpoint == c
    assert cfg["syn_count"].data_root == "/d/top" and cfg["syn_blobs"].data_root == "/d/blobs"
    s = load_sweep(_write(tmp_path, {**base, "per_dataset": {"syn_blobs": {"checkpoint": c}},
                                        "trial": {"epochs": 3, "warmup_epochs": 1},
                                        "grid": {"checkpoint": [b], "data_root": ["/d/grid"], "epochs": [2]}}))
    for t in plan_trials(s):
        assert (t.config.checkpoint, t.config.data_root, t.config.epochs) == (b, "/d/grid", 2), t.dataset
        assert t.hparams["checkpoint"] == b and t.hparams["data_root"] == "/d/grid"


def test_a_key_set_at_the_top_and_in_trial_is_refused(tmp_path):
    for key in ("checkpoint", "data_root"):
        data = {"name": "t", "datasets": ["syn_count"], "storage_path": str(tmp_path), key: "/x/top",
                "trial": {key: "/x/trial"}}
        with pytest.raises(ConfigError, match=f"'{key}' is set both at the top .* and in trial.{key}"):
            load_sweep(_write(tmp_path, data))


def test_a_checkpoint_on_the_line_replaces_every_file_layer(tmp_path):
    data = {"name": "t", "datasets": ["syn_count", "syn_blobs"], "storage_path": str(tmp_path), "checkpoint": "/a",
            "per_dataset": {"syn_blobs": {"checkpoint": "/c"}}}
    s = load_sweep(_write(tmp_path, data), ["checkpoint=/z"])
    assert {t.config.checkpoint for t in plan_trials(s)} == {"/z"}


# ----------------------------------------------------------------------------------------------- kind 4


@pytest.mark.parametrize("text", ["/d/vtab #v2", "/d/a: b", "/d/!x", "/d/&y", "/d/*z", "/d/{w}", "/d/1e3"])
def test_a_path_keeps_its_text_in_train_and_sweep(text, tmp_path):
    assert load_config([], [f"data_root={text}"]).data_root == text
    s = load_sweep(CI, [f"data_root={text}", f"storage_path={tmp_path}/run #2"])
    assert s.data_root == text and s.sweep_dir == tmp_path / "run #2" / "ci"
    assert {t.config.data_root for t in plan_trials(s)} == {text}
    s = load_sweep(CI, [f"trial.cache_dir={text}", f"storage_path={tmp_path}"])
    assert {t.config.cache_dir for t in plan_trials(s)} == {text}


@pytest.mark.parametrize(("override", "name"), [("name=yes", "yes"), ("name=1e3", "1e3"), ("name=null", "null"),
                                                ("name=012", "012"), ("name=on", "on")])
def test_a_text_sweep_key_keeps_what_yaml_would_retype(override, name, tmp_path):
    s = load_sweep(CI, [override, f"storage_path={tmp_path}"])
    assert s.name == name and s.sweep_dir == tmp_path / name


@pytest.mark.parametrize(("override", "needle"), [
    ("data_root=~", "'data_root' is a path"),
    ("checkpoint=~", "'checkpoint' is a path"),
    ("storage_path=~", "'storage_path' is a path"),
    ("storage_path=[a]", "'storage_path'"),
    ("name={a: 1}", "'name'"),
    ("lr=1e-3 #x", "comment"),
    ("grid.lr=[1e-3, 2e-3 #x]", "grid.lr"),
    ("epochs=&a 3", "anchors"),
    ("epochs=*a", "anchors"),
    ("epochs=!!int 3", "anchors"),
    ("seeds=[1, 2] #3", "comment"),
])
def test_what_yaml_would_change_is_refused_naming_the_key(override, needle, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_sweep(CI, [override, f"storage_path={tmp_path}"])
    assert needle in str(err.value) and override.partition("=")[0].split(".")[0] in str(err.value)
    key = override.partition("=")[0]
    if key in ("data_root", "checkpoint", "lr", "epochs"):  # trial keys: synqt train refuses them the same way
        with pytest.raises(ConfigError) as err:
            load_config([], [override])
        assert needle in str(err.value)


def _plan_modules(pkg):
    import importlib
    import pkgutil

    return [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


def test_the_sweep_has_no_second_override_parser():
    import inspect

    import launcher.plan

    source = "".join(inspect.getsource(m) for m in _plan_modules(launcher.plan))
    assert "yaml_load" not in source and "def yaml_value" not in source


def test_asha_max_t_below_a_trials_epochs_is_refused(tmp_path):
    """asha.max_t is an epoch budget the sweep sets: below a trial's epochs, ASHA would stop every such trial
    before it records a result while its config says it trains longer."""
    data = {"name": "a", "datasets": ["syn_count"], "protocol": "vtab", "storage_path": str(tmp_path),
            "asha": {"max_t": 4, "grace_period": 1}, "trial": {"epochs": 4, "warmup_epochs": 1}}
    assert len(plan_trials(load_sweep(_write(tmp_path, data)))) == 1
    with pytest.raises(ConfigError, match=r"asha.max_t=4 is below epochs=6 of search-syn_count-ep6-s42"):
        plan_trials(load_sweep(_write(tmp_path, {**data, "grid": {"epochs": [4, 6]}})))
