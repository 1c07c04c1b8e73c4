"""Convert a config of the published T2L code into one of ours: ``python -m utils.config convert published.yaml``.

Every key of the published layout (``data.num_segments``, ``prompt.DEEP``, ``solver.lr_warmup_step``, the extra
evaluation sets ``ucf_val_list`` ...) is mapped to ours where this project has it, and the published code's
implicit behaviour is written out (weight decay on every tensor, the lr updated every 10 iterations, fp16 weights,
stochastic depth by token position, its test-time rules). Keys that have no counterpart, or whose value asks for
something this project does not implement, are listed as dropped with the reason, in the output's header and on
stderr; nothing is dropped silently. The result is a complete config (no ``extends``), valid wherever it is saved.

Paths: the published configs name files relative to the published repository or by the authors' absolute paths.
With ``published_root`` (the folder where the published repository is checked out) relative paths are joined with
it, and absolute paths whose tail is one of its folders (``GPT_discription/``, ``lists/``, ``dataset_splits/``)
are moved under it; other absolute paths are kept and reported. The list files' own video paths are handled by
``paths: {keep_last: 1}`` (the published lists name flat frame folders) under ``root``.
"""
from __future__ import annotations

import os
from typing import Any, Optional

# The extra evaluation sets of the published train.py / train_base_to_novel.py: prefix -> our set name.
_EXTRA_SETS = {"ucf": "ucf101", "ucfds": "ucf101_ds", "hmdb": "hmdb51", "k600": "k600", "novel": "novel",
               "something": "ssv2"}
_REPO_FOLDERS = ("GPT_discription", "lists", "dataset_splits", "UCF_101_txt")

# Published keys that configure nothing in the published train.py / test.py (or only code paths not used).
_UNUSED = {
    "weight_save_dir": "the output folder is output_dir",
    "training_name": "the output folder is output_dir",
    "network.type": "a name in the published output path only",
    "network.sim_header": "the published train.py and test.py never build the fusion head it selects",
    "network.describe": "unused by the published code",
    "network.Return_Attention": "attention maps for figures, unused in training and testing",
    "data.modality": "RGB is the only modality",
    "data.split": "unused by the published code",
    "data.num_classes": "the class list gives the number of classes",
    "solver.start_epoch": "a resumed run of ours continues at its saved epoch",
    "solver.epoch_offset": "unused by the published code",
    "solver.momentum": "SGD only; the published recipe is AdamW",
    "solver.lr_decay_step": "multistep schedule only; the published recipe is cosine",
    "solver.lr_decay_factor": "multistep schedule only; the published recipe is cosine",
    "solver.clip_gradient": "never used by the published train.py (no gradient clipping): solver.grad_clip 0",
    "solver.loss_type": "unused by the published code",
    "solver.f_ratio": "unused by the published code",
    "solver.evaluate": "evaluation is test.py",
    "prompt.num_of_token": "unused by the published code",
    "prompt.num_of_text_token": "unused by the published code",
    "resume": "the published resume loads the weights and epoch of its own checkpoint: use network.init_from with a "
              "published checkpoint, or train.py --resume with one of ours",
}


class _Conversion:
    def __init__(self, source: str, published_root: Optional[str], root: Optional[str]):
        self.source = source
        self.published_root = published_root
        self.root = root
        self.dropped: list[tuple[str, Any, str]] = []
        self.notes: list[str] = []

    def drop(self, key: str, value: Any, reason: str) -> None:
        self.dropped.append((key, value, reason))

    def path(self, key: str, value: Optional[str]) -> Optional[str]:
        if not value:
            return None
        value = str(value).strip()
        if not os.path.isabs(value):
            return os.path.join(self.published_root, value) if self.published_root else value
        parts = value.replace("\\", "/").split("/")
        for i, part in enumerate(parts):
            if part in _REPO_FOLDERS and self.published_root:
                return os.path.join(self.published_root, *parts[i:])
        self.notes.append(f"{key}: {value} is a path of the authors' machine; set it to your copy")
        return value


def convert_published(published: dict, source: str = "published config", published_root: Optional[str] = None,
                      root: Optional[str] = None) -> tuple[dict, list, list]:
    """(our config as a dict, [(published key, value, why dropped)], [notes]) for a published config dict."""
    c = _Conversion(source, published_root, root)
    pub = {k: (v if v is not None else {}) if k in ("prompt", "data", "network", "solver", "logging") else v
           for k, v in (published or {}).items()}
    data, prompt, net, solver, log = (dict(pub.get(k) or {}) for k in ("data", "prompt", "network", "solver",
                                                                        "logging"))
    out: dict = {"seed": int(pub.get("seed", 0) or 0)}
    name = pub.get("training_name") or data.get("dataset") or "published"
    out["output_dir"] = f"output/{str(name).replace('/', '_')}"
    # --------------------------------------------------------------------------------- network
    t2l = {"adapter_ratio": 0.25, "vision_adapters": True, "text_adapters": True, "train_temporal_embedding": False,
           "drop_path_mode": "positions", "activation_checkpointing": False}
    if prompt.get("use", True) in (False, "False"):
        t2l["temporal_tokens"] = "none"
    else:
        t2l["temporal_tokens"] = "deep" if prompt.get("DEEP", True) else "shallow"
    t2l["prompt_dropout"] = float(prompt.get("DROPOUT", 0.1) or 0.0)
    if prompt.get("INITIATION", "random") != "random":
        c.drop("prompt.INITIATION", prompt["INITIATION"], "only the random initialisation exists (the published code "
                                                          "raises for any other)")
    drop_out = float(net.get("drop_out", 0.0) or 0.0)
    t2l["drop_path_rate"] = drop_out
    t2l["attention_dropout_rate"] = drop_out  # the published drop_out sets both (nn.MultiheadAttention dropout)
    network = {"pretrained": net.get("arch", "ViT-B/16"), "t2l": t2l}
    for key, want, what in (("tsm", False, "temporal shift modules"), ("joint", False, "joint space-time attention"),
                            ("init", True, "training CLIP from scratch")):
        if key in net and bool(net[key]) != want:
            c.drop(f"network.{key}", net[key], f"{what} are not part of T2L in this project" if key != "init" else
                   "this project always starts from pretrained CLIP weights")
    if float(net.get("emb_dropout", 0.0) or 0.0):
        c.drop("network.emb_dropout", net["emb_dropout"], "embedding dropout is not implemented (the published T2L "
                                                          "configs use 0)")
    if pub.get("T_Adapter") not in (None, False, "False"):
        c.drop("T_Adapter", pub["T_Adapter"], "the temporal-adapter variant is not part of T2L in this project")
    if net.get("fix_text"):
        c.drop("network.fix_text", net["fix_text"], "a frozen text tower is not an option here")
    train_list = c.path("data.train_list", data.get("train_list"))
    if pub.get("pretrain"):
        if train_list:
            network["init_from"] = str(pub["pretrain"])
        c.notes.append(f"pretrain: {pub['pretrain']} -> {'network.init_from' if train_list else 'test.weights'}; "
                       f"point it at your copy of the checkpoint")
    out["network"] = network
    # --------------------------------------------------------------------------------- data
    is_sth = "some" in str(data.get("dataset", "")).lower()
    if int(data.get("seg_length", 1) or 1) != 1:
        c.drop("data.seg_length", data["seg_length"], "one frame per segment is the only sampling here")
    randaug = data.get("randaug") or {}
    if int(randaug.get("N", 0) or 0) > 0:
        c.drop("data.randaug", randaug, "RandAugment is not implemented (the published T2L configs use N: 0)")
    classes = c.path("data.label_list", data.get("label_list"))
    descriptions = c.path("data.gpt_discription", data.get("gpt_discription"))
    use_llm = data.get("use_llm", True) not in (False, "False")
    batch = int(data.get("batch_size", 80))
    d = {"num_frames": int(data.get("num_segments", 8)), "input_size": int(data.get("input_size", 224)),
         "train_list": train_list, "root": root, "classes": classes, "descriptions": descriptions if use_llm else None,
         "text_mode": "descriptions" if use_llm else "templates", "missing_descriptions": "error",
         "image_tmpl": data.get("image_tmpl", "img_{:05d}.jpg"),
         "index_start": int(data.get("index_bias", 1) if data.get("index_bias") is not None else 1),
         "flip": not is_sth, "batch_size": batch, "num_workers": int(data.get("workers", 8)), "on_error": "skip",
         "train_sampling": "segments" if data.get("random_shift", True) not in (False, "False") else "test",
         "paths": {"keep_last": 1}}
    if not train_list:
        d = {k: v for k, v in d.items() if k not in ("train_list", "train_sampling", "paths")}
    out["data"] = d
    # --------------------------------------------------------------------------------- evaluation
    eval_batch = int(data.get("test_batch_size") or batch)
    sets = []

    def add_set(set_name, list_key, lst, cls, desc):
        lst = c.path(list_key, lst)
        if not lst:
            return
        entry = {"name": set_name, "lists": [lst], "root": root, "classes": cls, "paths": {"keep_last": 1},
                 "published_batch_size": eval_batch}
        if use_llm and desc:
            entry["descriptions"] = desc
        if not use_llm:
            entry["text_mode"] = "templates"
        sets.append(entry)

    base_name = str(data.get("dataset") or "val").lower().replace("-", "_")
    base_name = "".join(ch if ch.isalnum() or ch in "_.-" else "_" for ch in base_name) or "val"
    add_set(base_name + ("_val" if train_list else ""), "data.val_list", data.get("val_list"), classes, descriptions)
    for prefix, set_name in _EXTRA_SETS.items():
        if data.get(f"{prefix}_val_list"):
            add_set(set_name, f"data.{prefix}_val_list", data.get(f"{prefix}_val_list"),
                    c.path(f"data.{prefix}_label_list", data.get(f"{prefix}_label_list")),
                    c.path(f"data.{prefix}_gpt_discription", data.get(f"{prefix}_gpt_discription")))
    if train_list and sets:
        # The published train.py saves a best checkpoint per evaluated set, test sets included; here only the first
        # (its val_list, the training data's validation set) selects, and the others are only scored.
        sets[0]["select_best"] = True
        if len(sets) > 1:
            c.notes.append(f"the published train.py scores {', '.join(s['name'] for s in sets[1:])} every epoch and "
                           f"keeps a best checkpoint per set; here they are only scored (select_best: false): drop "
                           f"them from eval.sets to look at no test set while training")
        if data.get("novel_val_list"):
            sets[0]["group"], sets[-1]["group"] = "base", "novel"
    out["eval"] = {"every": int(log.get("eval_freq", 1) or 1), "rules": "published", "batch_size": eval_batch,
                   "num_clips": 1, "num_crops": 1, "sets": sets}
    # --------------------------------------------------------------------------------- solver
    if solver:
        if solver.get("type", "cosine") != "cosine":
            c.drop("solver.type", solver["type"], "only the cosine schedule with warm-up is implemented")
        if solver.get("optim", "adamw") != "adamw":
            c.drop("solver.optim", solver["optim"], "only AdamW is implemented (the published T2L configs use it)")
        if float(solver.get("ratio", 1) or 1) != 1.0:
            c.drop("solver.ratio", solver["ratio"], "a separate lr for the vision tower is not implemented")
        out["solver"] = {"epochs": int(solver.get("epochs", 150)), "lr": float(solver.get("lr", 1e-4)),
                         "warmup_epochs": float(solver.get("lr_warmup_step", 5)), "lr_update_every": 10,
                         "weight_decay": float(solver.get("weight_decay", 0.2)), "betas": [0.9, 0.98], "eps": 1e-8,
                         "no_decay_for_1d": False, "temporal_token_lr_scale": 1.0, "grad_clip": 0.0, "grad_accum": 1,
                         "precision": "fp16-pure"}
    else:
        out["solver"] = {"precision": "fp16-pure"}
    out["loss"] = {"tfd_weight": 1.0 if pub.get("use_motion_loss", True) not in (False, "False") else 0.0,
                   "gather": False}
    out["logging"] = {"print_freq": int(log.get("print_freq", 10) or 10)}
    if pub.get("pretrain") and not train_list:
        out["test"] = {"weights": [str(pub["pretrain"])]}
    # --------------------------------------------------------------------------------- what was not converted
    converted = {"seed", "pretrain", "use_motion_loss", "T_Adapter", "prompt.use", "prompt.INITIATION", "prompt.DEEP",
                 "prompt.DROPOUT", "network.arch", "network.init", "network.tsm", "network.drop_out",
                 "network.emb_dropout", "network.joint", "network.fix_text", "data.num_segments", "data.seg_length",
                 "data.batch_size", "data.test_batch_size", "data.workers", "data.image_tmpl", "data.use_llm",
                 "data.train_list", "data.val_list", "data.gpt_discription", "data.label_list", "data.index_bias",
                 "data.input_size", "data.randaug", "data.random_shift", "solver.type", "solver.epochs",
                 "solver.optim", "solver.lr", "solver.lr_warmup_step", "solver.weight_decay", "solver.ratio",
                 "logging.eval_freq", "logging.print_freq", "data.dataset"}
    converted |= {f"data.{p}_{k}" for p in _EXTRA_SETS for k in ("val_list", "label_list", "gpt_discription")}
    for top, value in pub.items():
        items = value.items() if isinstance(value, dict) and top in ("prompt", "data", "network", "solver",
                                                                     "logging") else [(None, value)]
        for sub, v in items:
            key = top if sub is None else f"{top}.{sub}"
            if key not in converted and v not in (None, "", {}):  # an empty key configures nothing
                c.drop(key, v, _UNUSED.get(key, "no counterpart in this project"))
    if root is None:
        c.notes.append("set data.root and each eval set's root to your frames folder (the list files' paths are read "
                       "with paths.keep_last: 1); frames of extract_frames.py: also paths.by_name and "
                       "paths.drop_extension: true")
    return out, c.dropped, c.notes


def render(converted: dict, dropped: list, notes: list, source: str) -> str:
    """The converted config as YAML, with what was dropped and what to check in its header comments."""
    import yaml

    lines = [f"# Converted from the published T2L config {source} by python -m utils.config convert."]
    if dropped:
        lines.append("# Published keys not converted (key: value -- why):")
        lines += [f"#   {k}: {v!r} -- {why}" for k, v, why in dropped]
    if notes:
        lines.append("# To check:")
        lines += [f"#   {n}" for n in notes]
    return "\n".join(lines) + "\n" + yaml.safe_dump(converted, sort_keys=False)
