"""Configs: every shipped YAML validates; extends, --opts, unknown keys and wrong types (issue 5)."""
from pathlib import Path

import pytest
import yaml

from utils.config import ConfigError, check_paths, load_config, parse_opts

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_every_shipped_config_validates_and_has_no_absolute_paths(path):
    cfg = load_config(ROOT / path)
    raw = yaml.safe_load((ROOT / path).read_text())

    def strings(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)
        elif isinstance(node, str):
            yield node

    absolute = [v for v in strings(raw) if Path(v).is_absolute() or v.startswith("~")]
    assert not absolute, f"{path}: machine paths {absolute}"
    for s in cfg.eval.sets:
        assert all(not Path(p).is_absolute() for p in s.lists)


def test_paper_recipe_is_the_default():
    """The published K-400 config's recipe (METHOD.md, "Training recipe")."""
    cfg = load_config(ROOT / "configs/K-400/k400_train.yaml")
    assert (cfg.data.num_frames, cfg.data.input_size, cfg.data.batch_size) == (8, 224, 80)
    assert (cfg.solver.lr, cfg.solver.weight_decay, cfg.solver.betas, cfg.solver.eps) == (1e-4, 0.2, [0.9, 0.98], 1e-8)
    assert cfg.solver.warmup_epochs == 5 and cfg.network.pretrained == "ViT-B/16"
    assert (cfg.solver.epochs, cfg.solver.lr_update_every, cfg.solver.grad_clip) == (150, 10, 0.0)
    assert cfg.solver.no_decay_for_1d is False and cfg.solver.precision == "fp16-pure"
    t2l = cfg.network.t2l
    assert t2l.temporal_tokens == "deep" and t2l.drop_path_rate == 0.1 and t2l.prompt_dropout == 0.1
    assert (t2l.drop_path_mode, t2l.attention_dropout_rate) == ("positions", 0.1)
    assert cfg.eval.rules == "published" and cfg.data.text_mode == "descriptions"
    # Model selection on K-400 validation only; no test set is evaluated while training.
    assert [(s.name, s.select_best) for s in cfg.eval.sets] == [("k400_val", True)]
    assert load_config(ROOT / "configs/few_shot/ssv2_2shot.yaml").data.flip is False
    # The published base-to-novel / few-shot configs train on the test-time frames (random_shift: False), with their
    # own epochs, lr and batch.
    b2n = load_config(ROOT / "configs/base_to_novel/ucf101_base_to_novel.yaml")
    assert (b2n.solver.epochs, b2n.solver.lr, b2n.data.batch_size, b2n.data.train_sampling) == (50, 1e-5, 60, "test")
    assert not any(s.select_best for s in b2n.eval.sets)
    fs = load_config(ROOT / "configs/few_shot/ucf101_2shot.yaml")
    assert (fs.solver.epochs, fs.data.batch_size, fs.network.t2l.attention_dropout_rate) == (100, 4, 0.0)


def test_no_shipped_config_selects_a_checkpoint_on_a_test_set():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        for s in load_config(path).eval.sets:
            if s.select_best:
                assert all("val" in Path(lst).name for lst in s.lists), (path, s.name, s.lists)


def test_extends_merges_and_opts_override(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  batch_size: 4\n  num_workers: 2\nsolver:\n  lr: 0.1\n")
    (tmp_path / "exp.yaml").write_text("extends: base.yaml\ndata:\n  batch_size: 8\n")
    cfg = load_config(tmp_path / "exp.yaml", ["solver.lr=1e-3", "data.flip=false"])
    assert (cfg.data.batch_size, cfg.data.num_workers, cfg.solver.lr, cfg.data.flip) == (8, 2, 1e-3, False)
    assert parse_opts(["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


def test_config_errors_name_key_file_and_choices(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key\(s\) data.batch_sise; valid keys of data: .*batch_size"):
        load_config(bad)
    bad.write_text("solver:\n  epochs: ten\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: solver.epochs: expected an integer, got 'ten'"):
        load_config(bad)
    bad.write_text("solver:\n  precision: fp8\n")
    with pytest.raises(ConfigError, match=r"solver.precision: must be one of auto, fp32, bf16, fp16"):
        load_config(bad)
    bad.write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*missing.yaml"):
        load_config(bad)
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("!!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError):
        load_config(bad)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_missing_inputs_are_listed_before_any_work(tmp_path):
    cfg = load_config(ROOT / "configs/K-400/k400_train.yaml", [f"data.train_list={tmp_path}/none.txt"])
    with pytest.raises(ConfigError, match=r"(?s)missing inputs.*data.train_list: .*none.txt does not exist.*"
                                          r"eval.sets\[k400_val\].lists\[0\]"):
        check_paths(cfg, train=True)


def test_opts_override_one_field_of_an_eval_set(tmp_path):
    (tmp_path / "exp.yaml").write_text(
        "eval:\n  sets:\n    - {name: a, lists: [a.txt], root: ra}\n    - {name: b, lists: [b.txt], root: rb}\n")
    cfg = load_config(tmp_path / "exp.yaml", ["eval.sets.1.root=elsewhere", "eval.sets.0.lists=[x.txt, y.txt]"])
    a, b = cfg.eval.sets
    assert (a.name, a.lists, a.root) == ("a", ["x.txt", "y.txt"], "ra"), "the other fields of the set are kept"
    assert (b.name, b.lists, b.root) == ("b", ["b.txt"], "elsewhere")
    with pytest.raises(ConfigError, match=r"eval.sets is a list of 2 item\(s\), .*index 0..1, got '2'"):
        load_config(tmp_path / "exp.yaml", ["eval.sets.2.root=x"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) eval.sets.0.rot"):
        load_config(tmp_path / "exp.yaml", ["eval.sets.0.rot=x"])
    # the whole list is still replaced by a list value
    cfg = load_config(tmp_path / "exp.yaml", ["eval.sets=[{name: c, lists: [c.txt]}]"])
    assert [s.name for s in cfg.eval.sets] == ["c"]


@pytest.mark.parametrize("opts, message", [
    (['eval.sets=[{name: ucf, lists: [["a.txt", "b.txt"]]}]'],
     r"eval.sets\[ucf\].lists\[0\] must be a list file's path, got \['a.txt', 'b.txt'\] \(list\)"),
    (["solver.epochs=-1"], r"solver.epochs must be at least 1, got -1$"),
    (["solver.lr=.inf"], r"solver.lr: expected a finite number, got inf$"),
    (["solver.lr=.nan"], r"solver.lr: expected a finite number, got nan$"),
    (["loss.tfd_weight=1e999"], r"loss.tfd_weight: expected a finite number, got '1e999'$"),
    (["solver.warmup_epochs=40"], r"solver.warmup_epochs must lie in 0..solver.epochs \(30\), got 40.0$"),
    (["test.weights=[[a.pt]]"], r"test.weights\[0\] must be a checkpoint's path, got \['a.pt'\]"),
])
def test_bad_values_are_one_line_config_errors_before_any_work(opts, message):
    """Before the fix: TypeError deep in a reader, 'total_steps must be a positive int, got -4', or an epoch
    trained at an infinite lr before the loss was caught."""
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, opts)
    assert "\n" not in str(info.value)


def test_deeply_nested_yaml_is_a_config_error_not_a_recursion_error(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("seed: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError, match=r"deep.yaml: a value is nested too deeply to be a config"):
        load_config(deep)
    with pytest.raises(ConfigError, match=r"with --opts: a value is nested too deeply"):
        load_config(None, ["seed=" + "{a: " * 3000 + "1" + "}" * 3000])


def test_every_t2l_option_is_settable_from_the_config_and_reaches_the_model():
    """network.t2l is derived from modules.t2l.T2LOptions: each field (and its choices) is a config key."""
    import dataclasses
    import json

    from modules import factory
    from modules.t2l import T2LOptions

    defaults = T2LOptions()
    wanted = {}
    for f in dataclasses.fields(T2LOptions):
        default = getattr(defaults, f.name)
        if f.name in T2LOptions.CHOICES:
            wanted[f.name] = next(c for c in T2LOptions.CHOICES[f.name] if c != default)
        elif isinstance(default, bool):
            wanted[f.name] = not default
        elif isinstance(default, float):
            wanted[f.name] = default / 2
        else:
            pytest.fail(f"T2LOptions.{f.name}: give this test a non-default value of its type")
    opts = [f"network.t2l.{k}={json.dumps(v)}" for k, v in wanted.items()]
    cfg = load_config(ROOT / "configs/demo/demo_train.yaml", opts)
    assert dataclasses.asdict(cfg.network.t2l) == wanted
    assert load_config(None).network.t2l.__dict__ == defaults.to_dict()  # the same defaults
    assert factory.build_model(cfg).options == T2LOptions(**wanted)
    for name, choices in T2LOptions.CHOICES.items():
        with pytest.raises(ConfigError, match=rf"network\.t2l\.{name}: must be one of {', '.join(choices)}"):
            load_config(None, [f"network.t2l.{name}=nonsense"])
    # The model's own range checks run on the config, before any work, naming the file.
    with pytest.raises(ConfigError, match=r"demo_train\.yaml: network\.t2l: .*prompt_dropout.* must lie in \[0, 1\)"):
        load_config(ROOT / "configs/demo/demo_train.yaml", ["network.t2l.prompt_dropout=1.5"])
