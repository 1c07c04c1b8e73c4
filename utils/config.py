"""Configuration: a typed schema with defaults, YAML files that extend a base, dotted ``--opts`` overrides.

Every key is declared below; an unknown key is an error that lists the valid keys of its section, a wrong type
is an error naming the key, the file and the expected type, and input files that must exist are checked before
any work starts (``check_paths``). Paths in a config are relative to the directory the scripts are run from
(the repository root) unless absolute; ``extends`` is relative to the file that names it.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from modules.t2l import T2LOptions
from utils.config_files import ConfigError, parse_opts, read_config_tree  # noqa: F401 (parse_opts: for callers)

logger = logging.getLogger(__name__)


def _section_of(options_cls, name: str):
    """A config section with the fields, types and defaults of the dataclass ``options_cls``, and no validation of
    its own: the values are checked by :func:`_build` (types, choices) and by ``options_cls`` in :func:`_validate`,
    so that every error names the config file."""
    hints = typing.get_type_hints(options_cls)
    section = dataclasses.make_dataclass(name, [
        (f.name, hints[f.name], field(default=f.default) if f.default is not dataclasses.MISSING else
         field(default_factory=f.default_factory)) for f in fields(options_cls)])
    section.__module__ = __name__
    return section


# network.t2l: the model's own options (modules/t2l.py T2LOptions), declared there once.
T2LSection = _section_of(T2LOptions, "T2LSection")


@dataclass
class PathsSection:
    """How a list file's paths become paths on this machine (datasets.lists.PathRules), e.g. for the published split
    files, which hold the authors' absolute paths: map {"<their prefix>/hmdb/": ""} plus the set's root."""
    map: dict = field(default_factory=dict)   # {prefix written in the list: replacement}; the longest prefix wins
    keep_last: int = 0                        # keep only the last K path components (joined with the root)
    drop_extension: bool = False              # "x.avi" -> "x": extract_frames.py names frame folders without it
    by_name: bool = False                     # find each video by name among the folders of <root>/manifest.txt


@dataclass
class NetworkSection:
    pretrained: str = "ViT-B/16"          # clip.load name or path, or "random" (demo and tests: see random_clip)
    random_clip: Optional[dict] = None    # the CLIP sizes when pretrained == "random"
    random_seed: int = 0
    clip_cache: Optional[str] = None      # download folder for CLIP weights (default ~/.cache/clip)
    t2l: T2LSection = field(default_factory=T2LSection)
    init_from: Optional[str] = None       # train.py: start from this T2L checkpoint's tensors (ours or published)
    compile: str = "off"                  # torch.compile the encoders: off | default | reduce-overhead | max-autotune
    trust_checkpoint: bool = False        # allow full unpickling of checkpoints (can run code): only your own files


@dataclass
class DataSection:
    num_frames: int = 8
    input_size: int = 224
    train_list: Optional[str] = None
    root: Optional[str] = None            # prefix for the list files' paths
    classes: Optional[str] = None         # class list CSV (id,name)
    descriptions: Optional[str] = None    # descriptions CSV; null -> templates
    text_mode: str = "descriptions"       # descriptions | templates
    missing_descriptions: str = "error"   # a class without a description: error | template (the first template)
    image_tmpl: str = "img_{:05d}.jpg"
    index_start: int = 1
    flip: bool = True                     # off for Something-Something, where left/right is the label
    batch_size: int = 80
    num_workers: int = 8
    on_error: str = "skip"                # skip | raise
    train_sampling: str = "segments"      # segments: a random frame per segment | test: the test-time frames
    # Where the clip transform runs: loader (the DataLoader workers) | device (the workers only decode; the batch is
    # cropped, resized, flipped, jittered and normalised on the device) | auto (device on a GPU, else loader). The
    # published test view (Pillow bicubic) always runs in the loader.
    transform_on: str = "auto"
    paths: PathsSection = field(default_factory=PathsSection)  # for train_list
    check_labels: bool = True             # refuse lists whose labels point at classes their videos are not named after
    allow_outside_root: bool = False      # list paths may lead outside their root (.., links): data and eval sets


@dataclass
class EvalSet:
    name: str = ""
    lists: list = field(default_factory=list)   # one list file per split; several -> mean and std
    root: Optional[str] = None
    classes: Optional[str] = None
    descriptions: Optional[str] = None
    text_mode: Optional[str] = None            # default: data.text_mode
    image_tmpl: Optional[str] = None
    index_start: Optional[int] = None
    class_subsets: Optional[dict] = None       # {size, num_subsets, seed}: K-600 protocol (all classes: splits)
    group: Optional[str] = None                # "base" | "novel" for base-to-novel
    paths: PathsSection = field(default_factory=PathsSection)
    # The published test code's batch size for this set: it drops the last incomplete batch (drop_last=True), so
    # results.json also gives the figures over those first floor(N / B) * B videos. We count every video.
    published_batch_size: Optional[int] = None
    select_best: bool = False                  # train.py keeps best_<name>.pt by this set's top-1 (validation sets only)


@dataclass
class EvalSection:
    every: int = 1                     # evaluate every N epochs during training (0 = never)
    # Test-time rules (datasets.TEST_RULES): "published" = the published T2L test code exactly (its frame choice,
    # Pillow bicubic resize, logit scale 100); "centre" = segment centres, torch bilinear resize, exp(logit_scale).
    rules: str = "published"
    batch_size: int = 16
    num_clips: int = 1
    num_crops: int = 1
    sets: list = field(default_factory=list)   # list of EvalSet


@dataclass
class SolverSection:
    epochs: int = 30
    lr: float = 1.0e-4
    min_lr: float = 0.0
    warmup_epochs: float = 5.0
    lr_update_every: int = 10          # the lr is updated at each epoch's first step, then every N steps (published: 10)
    weight_decay: float = 0.2
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1.0e-8
    no_decay_for_1d: bool = True       # no weight decay on biases and the temporal tokens
    temporal_token_lr_scale: float = 1.0  # the temporal tokens' lr = lr * this (published: 1; the demo's short run: 10)
    grad_clip: float = 0.0             # max grad norm; 0 = off
    grad_accum: int = 1
    # auto (bf16 autocast where supported, else fp16 autocast on GPU; fp32 on CPU) | fp32 | bf16 | fp16 | fp16-pure
    # (the published code: fp16 weights, fp32 optimiser step, no loss scaling; fp32 on CPU, as published)
    precision: str = "auto"
    max_nonfinite_steps: int = 5       # this many non-finite losses in a row stop the run


@dataclass
class LossSection:
    tfd_weight: float = 1.0
    gather: bool = False               # alignment loss over the embeddings of all ranks


@dataclass
class LoggingSection:
    print_freq: int = 10
    wandb: bool = False
    wandb_project: str = "t2l"
    wandb_mode: str = "offline"        # online | offline | disabled


@dataclass
class CheckpointSection:
    save_full: bool = False            # also write a published-layout full checkpoint each epoch
    keep_every: int = 0                # also keep epoch_N.pt every N epochs (0 = only last and best)
    # mid_epoch.pt part-way through an epoch, at the first optimiser step after either interval (0 = off); also
    # written on SIGTERM/SIGUSR1. They bound what a kill loses; the run resumes from the later of it and last.pt.
    every_steps: int = 0
    every_minutes: float = 10.0


@dataclass
class TestSection:
    weights: list = field(default_factory=list)  # T2L checkpoints (ours or published); several -> mean over runs
    baseline: bool = False                       # evaluate the frozen CLIP (frame average) instead of T2L


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "output/run"
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    network: NetworkSection = field(default_factory=NetworkSection)
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    solver: SolverSection = field(default_factory=SolverSection)
    loss: LossSection = field(default_factory=LossSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    test: TestSection = field(default_factory=TestSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Fields whose list items are sections themselves.
_LIST_ITEM_TYPES = {("eval", "sets"): EvalSet}
_CHOICES = {
    ("data", "text_mode"): ("descriptions", "templates"),
    ("data", "on_error"): ("skip", "raise"),
    ("eval", "rules"): ("published", "centre"),
    ("data", "missing_descriptions"): ("error", "template"),
    ("data", "train_sampling"): ("segments", "test"),
    ("data", "transform_on"): ("auto", "loader", "device"),
    ("solver", "precision"): ("auto", "fp32", "bf16", "fp16", "fp16-pure"),
    ("network", "compile"): ("off", "default", "reduce-overhead", "max-autotune"),
    ("logging", "wandb_mode"): ("online", "offline", "disabled"),
    **{("network", "t2l", name): choices for name, choices in T2LOptions.CHOICES.items()},
}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r} ({type(value).__name__})")
        return value
    if tp is float:
        number = value
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r} ({type(value).__name__})")
        try:
            finite = math.isfinite(number)  # YAML reads .inf and .nan as numbers
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    if tp is list or origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r} ({type(value).__name__})")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r} ({type(value).__name__})")
        return value
    return value


def _build(cls, data: Any, path: tuple, source: str):
    where_section = ".".join(path) or "(top level)"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section {where_section} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join('.'.join(path + (u,)) for u in unknown)}; "
                          f"valid keys of {where_section}: {', '.join(sorted(valid))}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        tp, value, key = hints[f.name], data[f.name], path + (f.name,)
        where = f"{source}: {'.'.join(key)}"
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value if value is not None else {}, key, source)
            continue
        value = _coerce(value, tp, where)
        if key in _LIST_ITEM_TYPES and value is not None:
            value = [_build(_LIST_ITEM_TYPES[key], item, key + (str(i),), source) for i, item in enumerate(value)]
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"{where}: must be one of {', '.join(_CHOICES[key])}, got {value!r}")
        kwargs[f.name] = value
    return cls(**kwargs)


def script_parser(description: str, examples: list[str], opts_example: str) -> argparse.ArgumentParser:
    """The command line that the config-driven programs (train.py, test.py) share: ``--config``, ``--opts`` and
    ``--compile``, with ``examples`` in the epilog; each program adds its own options."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n" + "\n".join(f"  {e}" for e in examples))
    p.add_argument("--config", required=True, help="experiment YAML (extends a base file)")
    p.add_argument("--opts", nargs="*", default=[], help=f"overrides by dotted key, e.g. {opts_example}")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the encoders (network.compile): default, reduce-overhead (CUDA graphs) or "
                        "max-autotune; the compile time is logged")
    return p


def load_config(path: Optional[str | Path], opts: Optional[list[str]] = None) -> Config:
    """Read, merge, override and validate a config. ``path`` None gives the defaults (plus ``opts``)."""
    source = str(path) if path else "(defaults)"
    try:
        data = read_config_tree(path, opts)
        cfg = _build(Config, data, (), source if not opts else f"{source} with --opts")
    except RecursionError:  # raised by the YAML reader itself, or by the merge, on a value nested ~1000 deep
        raise ConfigError(f"{source}{' with --opts' if opts else ''}: a value is nested too deeply to be a config "
                          f"(hundreds of levels of lists or mappings)") from None
    _validate(cfg, source)
    return cfg


def _validate(cfg: Config, source: str) -> None:
    positive = {"data.num_frames": cfg.data.num_frames, "data.input_size": cfg.data.input_size,
                "data.batch_size": cfg.data.batch_size, "eval.batch_size": cfg.eval.batch_size,
                "eval.num_clips": cfg.eval.num_clips, "solver.grad_accum": cfg.solver.grad_accum,
                "solver.lr_update_every": cfg.solver.lr_update_every, "solver.epochs": cfg.solver.epochs}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{source}: {key} must be at least 1, got {value}")
    solver = cfg.solver
    if not solver.lr > 0 or solver.min_lr < 0 or solver.eps <= 0 or solver.weight_decay < 0:
        raise ConfigError(f"{source}: solver.lr and solver.eps must be positive, solver.min_lr and "
                          f"solver.weight_decay at least 0; got lr {solver.lr}, eps {solver.eps}, min_lr "
                          f"{solver.min_lr}, weight_decay {solver.weight_decay}")
    if not 0 <= solver.warmup_epochs <= solver.epochs:
        raise ConfigError(f"{source}: solver.warmup_epochs must lie in 0..solver.epochs ({solver.epochs}), got "
                          f"{solver.warmup_epochs}")
    if len(solver.betas) != 2 or not all(type(b) in (int, float) and 0 <= b < 1 for b in solver.betas):
        raise ConfigError(f"{source}: solver.betas must be two numbers in [0, 1), got {solver.betas!r}")
    if not cfg.solver.temporal_token_lr_scale > 0:
        raise ConfigError(f"{source}: solver.temporal_token_lr_scale must be positive, got "
                          f"{cfg.solver.temporal_token_lr_scale}")
    if cfg.eval.num_crops not in (1, 3):
        raise ConfigError(f"{source}: eval.num_crops must be 1 or 3, got {cfg.eval.num_crops}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"{source}: data.num_workers must be >= 0, got {cfg.data.num_workers}")
    if cfg.checkpoint.every_steps < 0 or cfg.checkpoint.every_minutes < 0:
        raise ConfigError(f"{source}: checkpoint.every_steps and checkpoint.every_minutes must be >= 0 (0 = off), got "
                          f"{cfg.checkpoint.every_steps} and {cfg.checkpoint.every_minutes}")
    try:
        T2LOptions(**dataclasses.asdict(cfg.network.t2l))
    except ValueError as e:
        raise ConfigError(f"{source}: network.t2l: {e}") from None
    if cfg.network.pretrained == "random" and not cfg.network.random_clip:
        raise ConfigError(f"{source}: network.pretrained is 'random', so network.random_clip must give the CLIP "
                          f"sizes (embed_dim, image_resolution, vision_layers, ...)")
    names = [s.name for s in cfg.eval.sets]
    for s in cfg.eval.sets:
        if not s.name:
            raise ConfigError(f"{source}: every eval.sets entry needs a name")
        # The name becomes part of file names (best_<name>.pt, per_class_<name>_...): no path separators.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", s.name) or ".." in s.name:
            raise ConfigError(f"{source}: eval set name {s.name!r} may hold only letters, digits, '_', '-' and '.' "
                              f"(it is used in output file names)")
        if not s.lists:
            raise ConfigError(f"{source}: eval set {s.name!r} has no list files (eval.sets[].lists)")
        for i, item in enumerate(s.lists):
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{source}: eval.sets[{s.name}].lists[{i}] must be a list file's path, got "
                                  f"{item!r} ({type(item).__name__}); lists is one flat list of paths, one per split")
        if s.published_batch_size is not None and s.published_batch_size < 1:
            raise ConfigError(f"{source}: eval set {s.name!r}: published_batch_size must be at least 1, got "
                              f"{s.published_batch_size}")
        if s.group not in (None, "base", "novel"):
            raise ConfigError(f"{source}: eval set {s.name!r}: group must be base or novel, got {s.group!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: eval set names must be unique, got {names}")
    for i, item in enumerate(cfg.test.weights):
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{source}: test.weights[{i}] must be a checkpoint's path, got {item!r} "
                              f"({type(item).__name__})")


def check_paths(cfg: Config, train: bool) -> None:
    """Fail before any work if an input file the run needs is missing, naming the key and the path."""
    missing = []

    def need(key: str, value: Optional[str], folder: bool = False):
        if value is None:
            missing.append(f"{key} is not set")
        elif not (Path(value).is_dir() if folder else Path(value).is_file()):
            missing.append(f"{key}: {value} does not exist")

    if train:
        need("data.train_list", cfg.data.train_list)
        need("data.classes", cfg.data.classes)
        if cfg.data.descriptions and cfg.data.text_mode == "descriptions":
            need("data.descriptions", cfg.data.descriptions)
        if cfg.data.root:
            need("data.root", cfg.data.root, folder=True)
    for s in cfg.eval.sets:
        for i, lst in enumerate(s.lists):
            need(f"eval.sets[{s.name}].lists[{i}]", lst)
        need(f"eval.sets[{s.name}].classes", s.classes or (cfg.data.classes if train else None))
        if s.descriptions:
            need(f"eval.sets[{s.name}].descriptions", s.descriptions)
        if s.root:
            need(f"eval.sets[{s.name}].root", s.root, folder=True)
    for i, w in enumerate(cfg.test.weights if not train else []):
        need(f"test.weights[{i}]", w, folder=Path(w).is_dir())  # a checkpoint file or a model folder
    if missing:
        raise ConfigError("missing inputs, nothing was started:\n  " + "\n  ".join(missing))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (the exact settings of a run, for the output folder), atomically."""
    from utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False), what="config file")


def _main(argv=None) -> int:
    """``python -m utils.config convert PUBLISHED.yaml [--published-root DIR] [--root DIR] > ours.yaml``."""
    import argparse
    import sys

    from utils.published_config import convert_published, render

    p = argparse.ArgumentParser(prog="python -m utils.config", description="Config tools.")
    sub = p.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a config of the published T2L code into one of ours (stdout)",
                          description="Map every key of a published T2L config to ours; the keys that have no "
                                      "counterpart are listed (header comments and stderr), never dropped silently.",
                          epilog="example: python -m utils.config convert third_party/T2L/configs/K-400/"
                                 "k400_train.yaml --published-root third_party/T2L --root data/k400_frames > k400.yaml")
    conv.add_argument("published", help="the published YAML config")
    conv.add_argument("--published-root", default=None,
                      help="where the published repository is checked out: its relative paths are joined with it")
    conv.add_argument("--root", default=None, help="your frames folder (data.root and every eval set's root)")
    args = p.parse_args(argv)
    path = Path(args.published)
    try:
        published = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        print(f"python -m utils.config convert: error: {path}: {e}", file=sys.stderr)
        return 2
    if not isinstance(published, dict):
        print(f"python -m utils.config convert: error: {path}: not a mapping of sections", file=sys.stderr)
        return 2
    converted, dropped, notes = convert_published(published, str(path), args.published_root, args.root)
    for key, value, why in dropped:
        print(f"{path}: not converted: {key}: {value!r} -- {why}", file=sys.stderr)
    for note in notes:
        print(f"{path}: check: {note}", file=sys.stderr)
    sys.stdout.write(render(converted, dropped, notes, str(path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
