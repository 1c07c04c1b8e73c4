"""Export one embedding per video (or per text) from T2L or a frozen CLIP, in shards, resumably.

Videos: a list file (``<path> <num_frames> <label>`` per line, as test.py reads), a folder of videos or a folder
of frame folders (searched recursively). Each video is read with test.py's preprocessing, encoded, its views
(--clips x --crops) averaged, and its L2-normalised embedding written. Texts (--texts): a class list CSV
(``id,name``), a descriptions CSV (``SNo,Class Name,Description``) or a text file of prompts, one per line.

Written into OUT:
  shard_00000.npy ...   float32 (n, E), L2-normalised, n <= --shard-size rows
  frames_00000.npy ...  float32 (n, V, T, E) per-frame embeddings, each L2-normalised (with --per-frame)
  manifest.jsonl        one JSON object per row: path (or key, text, class_id, class_name, view, line), label,
                        shard, row, num_frames (frames in the video), model, config_hash
  failures.txt          '<path><TAB><reason>' for every video that could not be read
  export_config.json    the model identity and settings behind config_hash
  summary.json          counts and speed of the last run; extract_log.txt: the log

A shard is written to a temporary file, synced and renamed before its manifest lines are appended, and a
rerun first drops any shard without complete manifest lines (and any line whose shard is missing), so an
interrupted run is resumed by running the same command again: videos already in the manifest are skipped,
failed videos are tried again. A rerun with another model or other settings into the same OUT is refused.
Exit status: 0 all exported, 1 some videos could not be read (listed in failures.txt), 2 bad input.

Several GPUs or machines: ``torchrun --nproc_per_node N extract_features.py ...`` (the same arguments). Each rank
exports a contiguous part of the input (whole batches) into OUT/.parts/part-<rank>-of-<N>/, resumable by itself;
rank 0 then merges the parts into the files above, which are byte-identical to a single-process export of the same
inputs, and removes the parts. Rerunning the same command (with any number of ranks) resumes. Under torchrun the
exit status is 0 once the export is complete, also with unreadable videos (torchrun would restart it otherwise).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from utils.lock import FolderLockedError, exit_if_busy, lock_output_folder

if __name__ == "__main__":  # an export into a busy folder stops here, not after the seconds torch takes to import
    exit_if_busy("extract_features", sys.argv[1:], folder_option="--out")

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datasets import TEST_RULES, SampleLoadError, read_list_file
from datasets.readers import open_source
from datasets.transforms import build_transform
# The dataset's own test-view steps, so that a list file's frame counts are used exactly as test.py uses them.
from datasets.video_dataset import frame_count, sample_test_views
import features
from features import VIDEO_EXTENSIONS, VideoTextEncoder, find_videos, load_model, read_text_items
from utils.checkpoint import UnsafeCheckpointError
from utils.io import atomic_write, atomic_write_text, read_failures

logger = logging.getLogger("extract_features")

MANIFEST = "manifest.jsonl"
FAILURES = "failures.txt"
CONFIG = "export_config.json"
SUMMARY = "summary.json"
EXPORT_FORMAT = {"format": "t2l-features", "version": 1}


class BadInput(ValueError):
    """Input the run cannot use (missing files, a folder holding another export): exit status 2."""


NOT_OURS = "This folder holds files this tool did not write, which it will not overwrite: use another --out folder"
OUR_ARRAY = re.compile(r"^(shard|frames)_\d{5,}\.npy$")  # shard_name / frames_name


def _is_our_tmp(name: str) -> bool:
    """A temporary file of an atomic write of one of this tool's files: ``.<our file name>.<random>.tmp``."""
    if not (name.startswith(".") and name.endswith(".tmp")) or name.count(".") < 3:
        return False
    base = name[1:-len(".tmp")].rsplit(".", 1)[0]
    return base in (MANIFEST, FAILURES, SUMMARY, CONFIG) or bool(OUR_ARRAY.match(base))


# ---------------------------------------------------------------------------------------------- reading
class ExportVideos(Dataset):
    """Test views of each video, with every failure caught per video (never replaced by a neighbour).

    ``entries``: (path, frame count from the list or 0 to count). Item: ``{"index", "views" (V, T, 3, S, S) or
    None, "num_frames", "error"}``.
    """

    def __init__(self, entries: list, encoder: VideoTextEncoder):
        self.entries = entries
        self.num_frames = encoder.num_frames
        self.num_clips = encoder.num_clips
        self.image_tmpl = encoder.image_tmpl
        self.index_start = encoder.index_start
        self.frame_rule = TEST_RULES[encoder.test_rules]["frames"]
        self.transform = build_transform("test", encoder.input_size, num_crops=encoder.num_crops,
                                         resize=TEST_RULES[encoder.test_rules]["resize"])

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        path, listed = self.entries[index]
        try:
            source = open_source(path, self.image_tmpl, self.index_start)
            n = frame_count(source, listed)
            views = sample_test_views(source, n, self.num_frames, self.num_clips, self.transform, self.frame_rule)
            return {"index": index, "views": views, "num_frames": n, "error": ""}
        except SampleLoadError as e:
            return {"index": index, "views": None, "num_frames": 0, "error": e.reason or str(e)}
        except Exception as e:  # a decoder's own error type: still this video's failure, not the run's
            return {"index": index, "views": None, "num_frames": 0, "error": f"{type(e).__name__}: {e}"}


def collate(items: list) -> dict:
    """Keep every item's outcome; stack the views of the readable ones (B_ok, V, T, 3, S, S)."""
    ok = [it["views"] for it in items if not it["error"]]
    return {"items": [{k: v for k, v in it.items() if k != "views"} for it in items],
            "views": torch.stack(ok) if ok else None}


# ---------------------------------------------------------------------------------------------- writing
def shard_name(i: int) -> str:
    return f"shard_{i:05d}.npy"


def frames_name(i: int) -> str:
    return f"frames_{i:05d}.npy"


def _rows(path: Path) -> Optional[int]:
    """Rows of a .npy file from its header, or None when it is missing or unreadable."""
    try:
        return int(np.load(path, mmap_mode="r").shape[0])
    except (OSError, ValueError):
        return None


class ShardStore:
    """Shards plus manifest in one folder: recovery after a crash, buffered rows, atomic shard writes.

    Invariant: a manifest line exists only for a row of a shard that was completely written (the shard is
    renamed into place, synced, before its lines are appended), and a shard is used only when all of its rows
    have manifest lines. :meth:`recover` restores the invariant after a kill at any point.
    """

    def __init__(self, out: Path, shard_size: int, per_frame: bool, key_field: str, config_hash: str = ""):
        self.out = out
        self.config_hash = config_hash  # every manifest line carries it; a line without it is not ours
        self.shard_size = shard_size
        self.per_frame = per_frame
        self.key_field = key_field
        self.entries: list = []       # manifest lines, in order
        self.done: set = set()        # keys already written
        self.next_shard = 0
        self._rows: list = []
        self._frames: list = []
        self._meta: list = []

    def recover(self) -> None:
        """Read the manifest; drop torn lines, lines of incomplete or missing shards, and unlisted shard files."""
        manifest = self.out / MANIFEST
        lines, torn = [], False
        text = manifest.read_text(encoding="utf-8") if manifest.exists() else ""
        if text and not text.endswith("\n"):
            torn = True  # the last append was cut short by a kill: its lines are dropped below
        raw_lines = text.splitlines()
        for line_no, raw in enumerate(raw_lines, start=1):
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError:
                if line_no < len(raw_lines):  # only the last append can be cut short: anything else is not ours
                    raise BadInput(f"{manifest}:{line_no}: not a line this tool writes (not JSON): {raw[:80]!r}. "
                                   f"{NOT_OURS}") from None
                torn = True
                logger.warning("%s: dropping a cut-off line (interrupted write)", manifest)
                continue
            missing = [k for k in ("shard", "row", self.key_field) if not isinstance(entry, dict) or k not in entry]
            if missing or not all(isinstance(entry[k], int) for k in ("shard", "row")):
                lacks = ", ".join(missing) or "integer shard and row"
                raise BadInput(f"{manifest}:{line_no}: not a line this tool writes (no {lacks}): {raw[:80]!r}. "
                               f"{NOT_OURS}")
            if self.config_hash and entry.get("config_hash") != self.config_hash:
                raise BadInput(f"{manifest}:{line_no}: a line of another export (config hash "
                               f"{entry.get('config_hash')}, this folder's is {self.config_hash}). {NOT_OURS}")
            lines.append(entry)
        by_shard: dict = {}
        for entry in lines:
            by_shard.setdefault(entry["shard"], []).append(entry)
        keep = set()
        for shard, entries in by_shard.items():
            n = _rows(self.out / shard_name(shard))
            complete = n == len(entries) and sorted(e["row"] for e in entries) == list(range(n))
            if complete and self.per_frame:
                complete = _rows(self.out / frames_name(shard)) == n
            if complete:
                keep.add(shard)
            else:
                logger.warning("%s: shard %d is incomplete or missing (%s rows on disk, %d manifest lines): its "
                               "videos will be done again", self.out, shard, n, len(entries))
        self.entries = [e for e in lines if e["shard"] in keep]
        if torn or len(self.entries) != len(lines):
            atomic_write_text(manifest, "".join(json.dumps(e) + "\n" for e in self.entries))
        wanted = {shard_name(s) for s in keep} | ({frames_name(s) for s in keep} if self.per_frame else set())
        for p in self.out.iterdir():
            if (OUR_ARRAY.match(p.name) and p.name not in wanted) or _is_our_tmp(p.name):
                logger.info("removing %s (not in the manifest: left by an interrupted run)", p.name)
                p.unlink()
        self.done = {e[self.key_field] for e in self.entries}
        self.next_shard = max(keep) + 1 if keep else 0

    def add(self, meta: dict, embedding: np.ndarray, frames: Optional[np.ndarray] = None) -> None:
        """Buffer one row; a full buffer is written as the next shard."""
        self._meta.append(meta)
        self._rows.append(embedding)
        if self.per_frame:
            self._frames.append(frames)
        if len(self._rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one shard (frames first, then the shard, then the manifest lines)."""
        if not self._rows:
            return
        index = self.next_shard
        if self.per_frame:
            frames = np.stack(self._frames).astype(np.float32)
            atomic_write(self.out / frames_name(index), lambda f: np.save(f, frames))
        rows = np.stack(self._rows).astype(np.float32)
        atomic_write(self.out / shard_name(index), lambda f: np.save(f, rows))
        new = [{**meta, "shard": index, "row": r} for r, meta in enumerate(self._meta)]
        # One write of all the shard's lines, synced: a kill leaves at most a cut-off tail, which recover() drops.
        with open(self.out / MANIFEST, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(e) + "\n" for e in new))
            f.flush()
            os.fsync(f.fileno())
        self.entries.extend(new)
        self.done.update(e[self.key_field] for e in new)
        self.next_shard += 1
        self._rows, self._frames, self._meta = [], [], []

    @property
    def num_rows(self) -> int:
        return len(self.entries)

    @property
    def num_shards(self) -> int:
        return len({e["shard"] for e in self.entries})


# ---------------------------------------------------------------------------------------------- run
def read_video_entries(args) -> list:
    """(path, frame count from the list or 0, label or None) per video, in input order, without repeats."""
    src = Path(args.input)
    if src.is_dir():
        if args.root:
            raise BadInput("--root applies to list files; the input is a folder")
        entries = [(p, 0, None) for p in find_videos(src, args.image_tmpl, args.index_start)]
        if not entries:
            raise BadInput(f"{src}: no video files ({' '.join(VIDEO_EXTENSIONS[:6])} ...) and no frame folders "
                           f"(holding {args.image_tmpl.format(args.index_start)}) found")
    elif src.is_file():
        records = read_list_file(str(src), root=args.root, allow_outside_root=args.allow_outside_root)
        entries = [(r.path, r.num_frames, r.label) for r in records]
    else:
        raise BadInput(f"input not found: {src} (expected a list file, a folder of videos or of frame folders)")
    seen, unique = set(), []
    for e in entries:
        if e[0] in seen:
            logger.warning("%s: %s is listed more than once; its features are exported once", src, e[0])
            continue
        seen.add(e[0])
        unique.append(e)
    return unique


def check_or_write_config(out: Path, config: dict) -> None:
    """Record the export's settings; refuse a folder that holds features made differently, or files not ours.

    Without ``export_config.json`` (which an export writes before anything else) any file under one of the names
    this tool writes was put there by something else, and is refused rather than overwritten or deleted.
    """
    path = out / CONFIG
    if not path.exists():
        ours = sorted(p.name for p in out.iterdir() if p.name in (MANIFEST, FAILURES, SUMMARY)
                      or OUR_ARRAY.match(p.name))
        if ours:
            raise BadInput(f"{out} holds {', '.join(ours[:5])}{' ...' if len(ours) > 5 else ''} but no {CONFIG}: these "
                           f"files were not written by extract_features.py (an export writes {CONFIG} first), and "
                           f"this run would overwrite them. Use another --out folder, or move them away")
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise BadInput(f"{path} is unreadable ({e}); it belongs to an earlier export. Use a new --out folder "
                           f"or delete {out}") from None
        if not isinstance(old, dict) or old.get("format") != EXPORT_FORMAT["format"]:
            raise BadInput(f"{path} was not written by extract_features.py (no \"format\": "
                           f"\"{EXPORT_FORMAT['format']}\"). {NOT_OURS}")
        if old.get("config_hash") != config["config_hash"]:
            diffs = [f"{k}: {old.get('settings', {}).get(k)!r} -> {v!r}" for k, v in config["settings"].items()
                     if old.get("settings", {}).get(k) != v]
            raise BadInput(
                f"{out} already holds features made with another model or other settings (config hash "
                f"{old.get('config_hash')}, model {old.get('model', {}).get('source')}) than this run (config hash "
                f"{config['config_hash']}, model {config['model'].get('source')}); differences: "
                f"{'; '.join(diffs) or 'see ' + CONFIG}. Mixing them would give features that cannot be compared: "
                f"use another --out folder, or delete {out} to start over")
        return
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def encode_into(store: "ShardStore", pending: list, encoder: VideoTextEncoder, args, base: dict) -> tuple[dict, int]:
    """Encode ``pending`` ((path, frames, label) in order) ``args.batch_size`` at a time into ``store``.

    Returns (failures {path: reason}, videos exported). The store's last shard is flushed when all are done; an
    interruption keeps the shards already written.
    """
    failures: dict = {}
    loader = DataLoader(ExportVideos([(p, n) for p, n, _ in pending], encoder), batch_size=args.batch_size,
                        shuffle=False, num_workers=args.workers, collate_fn=collate,
                        pin_memory=encoder.device.type == "cuda", drop_last=False)
    done_now = 0
    bar = tqdm(total=len(pending), desc="videos", unit="video", disable=args.no_progress, dynamic_ncols=True)
    try:
        for batch in loader:
            if batch["views"] is not None:
                video, frames = encoder.encode_clips(batch["views"], return_frames=True)
                video, frames = video.numpy(), frames.numpy()
            j = 0
            for it in batch["items"]:
                path, _, label = pending[it["index"]]
                if it["error"]:
                    failures[path] = " ".join(it["error"].split())
                    logger.warning("cannot read %s: %s", path, failures[path])
                    continue
                store.add({"path": path, "label": label, "num_frames": it["num_frames"], **base}, video[j],
                          frames[j] if args.per_frame else None)
                j += 1
                done_now += 1
            bar.update(len(batch["items"]))
            bar.set_postfix(failed=len(failures), refresh=False)
        store.flush()
    finally:
        bar.close()
    return failures, done_now


def failures_text(failures: dict, entries: list) -> str:
    """failures.txt: '<path><TAB><reason>' per failed video, in input order."""
    order = {p: i for i, (p, _, _) in enumerate(entries)}
    return "".join(f"{p}\t{failures[p]}\n" for p in sorted(failures, key=order.get))


def encode_pending(store: ShardStore, pending: list, already_done: int, entries: list, encoder, args, base: dict,
                   folder: Path) -> tuple[dict, dict]:
    """Encode ``pending`` into ``store``, rewriting ``folder``'s failures.txt however that ends; returns the failures
    and the counts of this run (the summary's ``last_run``)."""
    start, failures = time.perf_counter(), {}
    try:
        failures, done_now = encode_into(store, pending, encoder, args, base)
    finally:
        atomic_write_text(folder / FAILURES, failures_text(failures, entries))
    return failures, {"exported": done_now, "already_done": already_done, "failed": len(failures),
                      "seconds": round(time.perf_counter() - start, 3)}


def export_videos(args, encoder: VideoTextEncoder, out: Path, dist_info=None) -> dict:
    """Export the videos of ``args.input``; under torchrun (``dist_info``) each rank exports its part (:mod:`parts
    <extract_features>`: :func:`rank_slice`, :func:`merge_parts`) and rank 0 merges them into the same files."""
    from utils.distributed import DistInfo, all_gather_objects

    dist_info = dist_info or DistInfo()
    entries = read_video_entries(args)
    extra = {**EXPORT_FORMAT, "mode": "videos", "per_frame": bool(args.per_frame)}
    config_hash = encoder.config_hash(extra)
    store = ShardStore(out, args.shard_size, args.per_frame, key_field="path", config_hash=config_hash)
    error, run_id = None, f"{os.getpid()}-{time.time_ns()}"
    if dist_info.is_main:  # the folder's files are checked and repaired once, before any rank reads them
        try:
            check_or_write_config(out, {**extra, "config_hash": config_hash, "model": encoder.identity,
                                        "settings": {**encoder.settings(), **extra}, "embed_dim": encoder.embed_dim})
            store.recover()
        except BadInput as e:
            error = str(e)
    if dist_info.enabled:
        error, run_id = all_gather_objects((error, run_id))[0]  # rank 0's outcome and run id, on every rank
    if error:
        raise BadInput(error)
    base = {"model": encoder.describe(), "config_hash": config_hash}
    start = time.perf_counter()
    if dist_info.world_size == 1 and not (out / PARTS).is_dir():
        pending = [e for e in entries if e[0] not in store.done]
        logger.info("%d videos in %s: %d already exported, %d to do", len(entries), args.input,
                    len(entries) - len(pending), len(pending))
        failures, last = encode_pending(store, pending, len(entries) - len(pending), entries, encoder, args, base, out)
    else:
        last = export_part(args, encoder, out, entries, store, config_hash, base, dist_info, run_id)
        if not dist_info.is_main:
            return {"mode": "videos", "rank": dist_info.rank, "last_run": last}
        records = wait_for_parts(out, dist_info.world_size, run_id)
        failures = merge_parts(out, entries, store, config_hash, args, run_id)
        last = {k: sum(r[k] for r in records) for k in ("exported", "already_done")}
        last.update(failed=len(failures), seconds=round(time.perf_counter() - start, 3))
    seconds, todo = last["seconds"], last["exported"] + last["failed"]
    if todo and last["exported"] == 0:
        logger.error("none of the %d videos to do could be read: check the paths (--root), the frame file naming "
                     "(--image-tmpl, --index-start) and %s", todo, out / FAILURES)
    return {"mode": "videos", "input": os.fspath(args.input), "videos_in_input": len(entries),
            "exported": store.num_rows, "failed": len(failures), "shards": store.num_shards,
            "config_hash": config_hash,
            "last_run": {**last, "videos_per_second": round(todo / seconds, 3) if seconds > 0 else None,
                         "batch_size": args.batch_size, "workers": args.workers, "ranks": dist_info.world_size}}


# ---------------------------------------------------------------------------------------------- several ranks
# Under torchrun each rank exports a contiguous run of whole batches of the input into a folder of its own,
# OUT/.parts/part-<rank>-of-<ranks>/ (a ShardStore: resumable by itself, like OUT), and says so in its done.json;
# rank 0 then merges every part into OUT's shards and manifest in input order, shard_size rows per shard, and
# removes the parts. Each batch holds the same videos as a single process's batch, so the merged files are
# byte-identical to a single-process export of the same inputs.
PARTS = ".parts"
PART_DONE = "done.json"


def part_folder(out: Path, rank: int, world_size: int) -> Path:
    return out / PARTS / f"part-{rank:05d}-of-{world_size:05d}"


def rank_slice(num_entries: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the input rows that ``rank`` exports: whole batches, as even as possible, in rank order."""
    batches = -(-num_entries // batch_size)
    lo, hi = batches * rank // world_size, batches * (rank + 1) // world_size
    return min(lo * batch_size, num_entries), min(hi * batch_size, num_entries)


def _part_keys(folder: Path) -> set:
    """The paths a part's manifest lists (its complete lines); read-only."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return set()
    keys = set()
    for line in manifest.read_text(encoding="utf-8").splitlines():
        try:
            keys.add(json.loads(line)["path"])
        except (ValueError, KeyError, TypeError):
            pass  # a cut-off last line: its shard is not complete, and the part's own recovery drops it
    return keys


def export_part(args, encoder, out: Path, entries: list, store: ShardStore, config_hash: str, base: dict, dist_info,
                run_id: str) -> dict:
    """Export this rank's slice of ``entries`` into its part folder; returns this rank's counts."""
    folder = part_folder(out, dist_info.rank, dist_info.world_size)
    folder.mkdir(parents=True, exist_ok=True)
    part = ShardStore(folder, args.shard_size, args.per_frame, key_field="path", config_hash=config_hash)
    part.recover()
    done = set(store.done) | part.done
    for other in (out / PARTS).iterdir():  # parts of an earlier run with another number of ranks: not redone
        if other != folder and not other.name.endswith(f"-of-{dist_info.world_size:05d}"):
            done |= _part_keys(other)
    lo, hi = rank_slice(len(entries), args.batch_size, dist_info.rank, dist_info.world_size)
    mine = entries[lo:hi]
    pending = [e for e in mine if e[0] not in done]
    logger.info("rank %d of %d: videos %d-%d of %d in %s: %d already exported, %d to do", dist_info.rank,
                dist_info.world_size, lo + 1, hi, len(entries), args.input, len(mine) - len(pending), len(pending))
    failures, last = encode_pending(part, pending, len(mine) - len(pending), entries, encoder, args, base, folder)
    atomic_write_text(folder / PART_DONE, json.dumps({"run": run_id, **last}) + "\n")
    if failures and not dist_info.is_main:
        logger.warning("rank %d: %d video(s) could not be read; rank 0 lists them in %s", dist_info.rank,
                       len(failures), out / FAILURES)
    return last


def _done_record(folder: Path, run_id: str):
    """The part's done.json when this run (``run_id``) wrote it, else None."""
    try:
        record = json.loads((folder / PART_DONE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("run") == run_id else None


def wait_for_parts(out: Path, world_size: int, run_id: str, poll: float = 0.5) -> list:
    """Block until every rank's part of this run is done; returns their done.json records."""
    waiting_since, said = time.monotonic(), 0.0
    while True:
        records = [_done_record(part_folder(out, rank, world_size), run_id) for rank in range(world_size)]
        missing = [r for r, rec in enumerate(records) if rec is None]
        if not missing:
            return records
        if time.monotonic() - waiting_since - said > 60:
            said = time.monotonic() - waiting_since
            logger.info("waiting for rank(s) %s to finish their parts (%.0f s)", missing, said)
        time.sleep(poll)


def merge_parts(out: Path, entries: list, store: ShardStore, config_hash: str, args, run_id: str) -> dict:
    """Rank 0, once every part of this run is done (:func:`wait_for_parts`): append the parts' rows to OUT's store in
    input order (whole shards, as one process writes them), write failures.txt, and remove the parts. Returns the
    failures.

    A kill during the merge loses nothing: the parts are removed only once OUT's manifest holds their rows, and a
    rerun merges what is left (rows already in OUT are not added twice).
    """
    rows: dict = {}  # path -> (part folder, shard, row, manifest entry)
    for folder in sorted((out / PARTS).iterdir()):
        part = ShardStore(folder, args.shard_size, args.per_frame, key_field="path", config_hash=config_hash)
        part.recover()
        for e in part.entries:
            rows.setdefault(e["path"], (folder, e))
    arrays: dict = {}

    def row_of(folder: Path, e: dict, name) -> np.ndarray:
        key = (folder, name(e["shard"]))
        if key not in arrays:
            arrays[key] = np.load(folder / name(e["shard"]), mmap_mode="r")
        return np.array(arrays[key][e["row"]])

    merged = 0
    for path, _, _ in entries:
        if path in rows and path not in store.done:
            folder, e = rows[path]
            meta = {k: v for k, v in e.items() if k not in ("shard", "row")}
            store.add(meta, row_of(folder, e, shard_name), row_of(folder, e, frames_name) if args.per_frame else None)
            merged += 1
    store.flush()
    failures: dict = {}
    for folder in sorted((out / PARTS).iterdir()):  # this run's parts retried their failures: only theirs count
        if _done_record(folder, run_id) is not None:
            failures.update(read_failures(folder / FAILURES))
    failures = {p: r for p, r in failures.items() if p not in store.done}
    atomic_write_text(out / FAILURES, failures_text(failures, entries))
    arrays.clear()
    shutil.rmtree(out / PARTS)
    logger.info("merged %d rows of the ranks' parts into %s (%d rows, %d shards)", merged, out, store.num_rows,
                store.num_shards)
    return failures


def export_texts(args, encoder: VideoTextEncoder, out: Path) -> dict:
    import clip

    items, kind = read_text_items(args.texts, descriptions=args.descriptions, templates=args.templates)
    sources = [args.texts] + ([args.descriptions] if args.descriptions else [])
    # The texts are part of the identity: a rerun with another file must not be taken for the same rows.
    extra = {**EXPORT_FORMAT, "mode": "texts", "per_frame": False, "templates": bool(args.templates),
             "texts_sha256": [clip.file_sha256(p) for p in sources]}
    config_hash = encoder.config_hash(extra)
    check_or_write_config(out, {**extra, "config_hash": config_hash, "model": encoder.identity,
                                "settings": {**encoder.settings(), **extra}, "embed_dim": encoder.embed_dim})
    store = ShardStore(out, args.shard_size, False, key_field="key", config_hash=config_hash)
    store.recover()
    keyed = [(f"line {it.line}" if it.line is not None else f"view {it.view} class {it.class_id}", it)
             for it in items]
    pending = [(k, it) for k, it in keyed if k not in store.done]
    logger.info("%d texts (%s) in %s: %d already exported", len(items), kind, args.texts, len(items) - len(pending))
    base = {"model": encoder.describe(), "config_hash": config_hash}
    start = time.perf_counter()
    step = 256
    for i in tqdm(range(0, len(pending), step), desc="texts", unit="batch", disable=args.no_progress,
                  dynamic_ncols=True):
        chunk = pending[i:i + step]
        emb = encoder.encode_texts([it.text for _, it in chunk], source=os.fspath(args.texts)).numpy()
        for (key, it), e in zip(chunk, emb):
            meta = {"key": key, "text": it.text, "class_id": it.class_id, "class_name": it.class_name,
                    "view": it.view, "line": it.line, **base}
            store.add(meta, e)
    store.flush()
    atomic_write_text(out / FAILURES, "")
    seconds = time.perf_counter() - start
    return {"mode": "texts", "kind": kind, "input": os.fspath(args.texts), "texts": len(items),
            "exported": store.num_rows, "failed": 0, "shards": store.num_shards, "config_hash": config_hash,
            "last_run": {"exported": len(pending), "already_done": len(items) - len(pending),
                         "seconds": round(seconds, 3)}}


# ---------------------------------------------------------------------------------------------- command line
EXAMPLES = """examples:
  # one embedding per validation video of the demo, with the demo's T2L checkpoint
  python extract_features.py demo_data/val.txt --root demo_data/frames --model demo_output/train/last.pt \\
      --out features/demo_val
  # the same on 4 GPUs (each rank exports its part; rank 0 merges them into the same files)
  torchrun --nproc_per_node 4 extract_features.py demo_data/val.txt --root demo_data/frames \\
      --model demo_output/train/last.pt --out features/demo_val
  # a folder of .mp4 files, frozen CLIP ViT-B/16, 3 clips x 3 crops averaged, per-frame embeddings too
  python extract_features.py my_videos/ --model ViT-B/16 --out features/mine --clips 3 --crops 3 --per-frame
  # the class texts (descriptions) in the same embedding space
  python extract_features.py --texts demo_data/classes.csv --descriptions demo_data/descriptions.csv \\
      --model demo_output/train/last.pt --out features/demo_classes
  # then, in Python: nearest class per video
  #   v = np.concatenate([np.load(p) for p in sorted(glob('features/demo_val/shard_*.npy'))])
  #   t = np.concatenate([np.load(p) for p in sorted(glob('features/demo_classes/shard_*.npy'))])
  #   top1 = (v @ t.T).argmax(1)   # rows of t follow manifest.jsonl's class_id
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", help="list file, folder of videos or folder of frame folders (not with --texts)")
    p.add_argument("--model", required=True,
                   help="T2L checkpoint (ours or published), a CLIP name (ViT-B/16 ...) or a CLIP weights file")
    p.add_argument("--out", required=True, help="output folder (created; rerun the same command to resume)")
    p.add_argument("--texts", help="export text embeddings instead: a class list CSV (id,name), a descriptions "
                                   "CSV (SNo,Class Name,Description) or a text file with one prompt per line")
    p.add_argument("--descriptions", help="with --texts CLASSES.csv: the descriptions CSV of those classes")
    p.add_argument("--templates", action="store_true",
                   help="with --texts CLASSES.csv: the 16 prompt templates per class (rows are view-major: v*K+k)")
    p.add_argument("--root", help="folder the list file's relative paths are taken from")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="with --root: accept list paths that lead outside it (.., links to other disks)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per batch (default 8)")
    p.add_argument("--workers", type=int, default=2, help="data loading worker processes (default 2)")
    p.add_argument("--shard-size", type=int, default=1000, help="rows per shard file (default 1000)")
    p.add_argument("--per-frame", action="store_true", help="also save per-frame embeddings (frames_*.npy)")
    p.add_argument("--compile", nargs="?", const="default", default="off", metavar="MODE",
                   choices=("off", "default", "reduce-overhead", "max-autotune"),
                   help="torch.compile the encoders: default, reduce-overhead (CUDA graphs) or max-autotune; the "
                        "compile time is logged")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model (default: torch's choice; 1 is often fastest on a busy machine)")
    features.add_view_arguments(p, device="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def validate(args, parser) -> None:
    if (args.input is None) == (args.texts is None):
        parser.error("give either INPUT (a list file or a folder of videos) or --texts FILE, not both or neither")
    if (args.descriptions or args.templates) and not args.texts:
        parser.error("--descriptions and --templates apply to --texts")
    for name in ("batch_size", "shard_size", "clips"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")


def main(argv=None) -> int:
    """Run an export; returns the exit status (0 done, 1 some videos unreadable, 2 bad input).

    Under ``torchrun`` every rank exports its part of the videos and rank 0 merges them; every rank returns 0 once
    the export is complete, unreadable videos or not (they are in failures.txt and summary.json): torchrun takes any
    other status for a failed worker and would restart the finished export.
    """
    from utils import distributed

    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        logger.error("--out %s exists and is not a folder", out)
        return 2
    try:
        dist_info = distributed.setup(args.device)
    except RuntimeError as e:  # a device that is not there
        logger.error("%s", e)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
        try:  # one export per folder at a time (under torchrun rank 0 holds the lock for all ranks)
            lock = lock_output_folder(out, "extract_features.py", dist_info)
        except FolderLockedError as e:
            logger.error("%s", e)
            return 2
        try:
            return _run(args, out, lock, dist_info)
        finally:
            if lock:
                lock.release()
    finally:
        distributed.cleanup()


def _run(args, out: Path, lock, dist_info) -> int:
    from utils.logger import setup_logging

    setup_logging(str(out), dist_info.rank, filename="extract_log.txt")
    if lock:
        lock.log_takeover()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = dist_info.device if dist_info.enabled else args.device  # torchrun: this rank's GPU (LOCAL_RANK)
    try:
        encoder = load_model(args.model, device=device, precision=args.precision, num_frames=args.frames,
                             input_size=args.input_size, num_clips=args.clips, num_crops=args.crops,
                             image_tmpl=args.image_tmpl, index_start=args.index_start, trust=args.trust_checkpoint,
                             test_rules=args.rules, compile=args.compile)
        if args.texts and not dist_info.is_main:
            logger.info("rank %d: texts are exported by rank 0 alone", dist_info.rank)
            return 0
        summary = export_texts(args, encoder, out) if args.texts else export_videos(args, encoder, out, dist_info)
        if not dist_info.is_main:
            return 0
    except KeyboardInterrupt:
        logger.error("interrupted: the shards written so far are kept; run the same command again to resume")
        return 130
    except (BadInput, FileNotFoundError, ValueError, SampleLoadError, UnsafeCheckpointError, OSError) as e:
        # ValueError covers ListFileError, CheckpointError, CLIPLoadError and bad sizes: each names what is wrong
        logger.error("%s", e)
        return 2
    summary.update(model=encoder.describe(), embed_dim=encoder.embed_dim, device=str(encoder.device),
                   dtype=str(encoder.dtype).replace("torch.", ""))
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    last = summary["last_run"]
    logger.info("done: %d %s exported in %d shard(s) under %s (%d this run, %d already there), %d failed%s; "
                "%.1f s", summary["exported"], summary["mode"], summary["shards"], out, last["exported"],
                last["already_done"], summary["failed"], f" (see {out / FAILURES})" if summary["failed"] else "",
                last["seconds"])
    if summary["mode"] == "videos" and last.get("videos_per_second"):
        logger.info("throughput: %.2f videos/s (%s, %s)", last["videos_per_second"], summary["device"],
                    summary["dtype"])
    if dist_info.enabled and summary["failed"]:
        # torchrun reads any other status as a failed worker and would restart (--max-restarts) a finished export
        logger.warning("%d video(s) could not be read (see %s); exit status 0 under torchrun, as the export is "
                       "complete", summary["failed"], out / FAILURES)
        return 0
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
