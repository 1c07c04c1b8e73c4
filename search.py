"""Search an extract_features.py export by text or by video: cosine similarity in the same model's space.

    python search.py --index features/demo_val "a shape moving to the left" -k 5
    python search.py --index features/demo_val --like demo_data/videos/val/growing/growing_000.mp4 --json
    python search.py --index features/big --build-index hnsw        # FAISS (optional), for millions of videos

The export's rows are L2-normalised, so a dot product is a cosine similarity. A text query is embedded by the model
that made the export (export_config.json names it and its SHA-256; --model must be that same model); a video query
("more like this") is a video of the export (its stored row, itself left out of the results), a row number
(``row:12``), or any other video or frames folder, encoded with the export's settings.

Exact search reads the shards memory-mapped, one at a time, and keeps a running top-k: nothing bigger than one
shard's scores is in memory, so it serves any collection whose shards fit on disk (cost: one pass over the
embeddings per batch of queries). For millions of videos build a FAISS index once (--build-index hnsw, or ivf, flat,
or any faiss factory string such as "IVF4096,PQ64"); it is saved next to the shards (index.faiss, index.json) and
used when it matches the export (same rows, same manifest, same config hash). FAISS is optional
(``pip install faiss-cpu``); without it the exact search is used.
Exit status: 0 done, 2 bad input (a missing export, a model other than the export's, no FAISS for --engine faiss).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

logger = logging.getLogger("search")

MANIFEST, CONFIG = "manifest.jsonl", "export_config.json"
INDEX_FILE, INDEX_META = "index.faiss", "index.json"


class SearchError(ValueError):
    """Input the search cannot use; the message names the file or option (exit status 2)."""


# ---------------------------------------------------------------------------------------------- the collection
@dataclass
class Collection:
    """The rows of an export: ``entries[i]`` (its manifest line) describes ``row i`` of the shards, in order."""

    folder: Path
    config: dict
    entries: list
    shards: list          # [(path, rows)] in row order
    manifest_sha256: str

    @classmethod
    def open(cls, folder) -> "Collection":
        """Read an export folder (extract_features.py --out); only shards whose manifest lines are complete count."""
        folder = Path(folder)
        config_path, manifest = folder / CONFIG, folder / MANIFEST
        if not config_path.is_file() or not manifest.is_file():
            raise SearchError(f"{folder} is not an extract_features.py export (no {CONFIG} or {MANIFEST})")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise SearchError(f"{config_path} is not valid JSON ({e})") from e
        raw = manifest.read_bytes()
        lines = raw.decode("utf-8").splitlines(keepends=True)
        entries, used = [], 0
        for no, line in enumerate(lines, start=1):
            if not line.endswith("\n"):
                break  # an append cut short by a kill: not part of the export yet
            try:
                entries.append(json.loads(line))
            except ValueError as e:
                raise SearchError(f"{manifest}:{no}: not a JSON line ({e})") from e
            used += len(line.encode("utf-8"))
        by_shard: dict = {}
        for e in entries:
            by_shard.setdefault(int(e["shard"]), []).append(e)
        shards, rows = [], []
        for s in sorted(by_shard):
            group = sorted(by_shard[s], key=lambda e: int(e["row"]))
            path = folder / f"shard_{s:05d}.npy"
            try:
                n = int(np.load(path, mmap_mode="r").shape[0])
            except (OSError, ValueError):
                n = -1
            if n != len(group) or [int(e["row"]) for e in group] != list(range(n)):
                logger.warning("%s: shard %d is incomplete (%s rows, %d manifest lines): left out of the search", folder,
                               s, n if n >= 0 else "no", len(group))
                continue
            shards.append((path, n))
            rows += group
        if not rows:
            raise SearchError(f"{folder} holds no exported rows yet")
        return cls(folder, config, rows, shards, hashlib.sha256(raw[:used]).hexdigest())

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def embed_dim(self) -> int:
        return int(np.load(self.shards[0][0], mmap_mode="r").shape[1])

    @property
    def config_hash(self) -> Optional[str]:
        return self.config.get("config_hash")

    def chunks(self):
        """(first row, float32 (n, E) memory-mapped) per shard, in order."""
        offset = 0
        for path, n in self.shards:
            yield offset, np.load(path, mmap_mode="r")
            offset += n

    def vector(self, row: int) -> np.ndarray:
        """The stored embedding of one row, (E,)."""
        if not 0 <= row < len(self):
            raise SearchError(f"row {row} is out of range: the export has rows 0..{len(self) - 1}")
        return self.take([row])[0]

    def take(self, rows) -> np.ndarray:
        """The stored embeddings of ``rows`` (valid row numbers, any order), float32 (len(rows), E): each shard is
        opened once and its rows gathered in one indexing."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.embed_dim), np.float32)
        ends = np.cumsum([n for _, n in self.shards])
        which = np.searchsorted(ends, rows, side="right")  # the shard of every row
        for s in np.unique(which):
            mine = np.flatnonzero(which == s)
            first = int(ends[s]) - self.shards[s][1]
            out[mine] = np.load(self.shards[s][0], mmap_mode="r")[rows[mine] - first]
        return out

    def find(self, path: str) -> Optional[int]:
        """The row of a video by its path: as exported, the same file under another spelling, or the end of exactly
        one exported path (``val/growing/growing_000`` for ``/data/frames/val/growing/growing_000``); else None."""
        want = os.path.realpath(path)
        tail = "/" + path.strip("/")
        ends = []
        for i, e in enumerate(self.entries):
            p = e.get("path")
            if p is None:
                continue
            if p == path or os.path.realpath(p) == want:
                return i
            if p.endswith(tail):
                ends.append(i)
        if len(ends) > 1:
            raise SearchError(f"--like {path}: {len(ends)} videos of the export end with it "
                              f"({', '.join(self.entries[i]['path'] for i in ends[:3])} ...): give more of the path")
        return ends[0] if ends else None

    def describe_row(self, row: int) -> dict:
        e = self.entries[row]
        out = {"row": row}
        for key in ("path", "text", "label", "class_id", "class_name"):
            if e.get(key) is not None:
                out[key] = e[key]
        return out


# ---------------------------------------------------------------------------------------------- exact search
def _topk(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple:
    """Per query (row of the arrays), the k best by score, ties by the lower row; (Q, m) -> (Q, min(k, m)), best first."""
    k = min(k, scores.shape[1])
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        sel_s, sel_r = np.take_along_axis(scores, part, 1), np.take_along_axis(rows, part, 1)
        kth = sel_s.min(axis=1, keepdims=True)
        # argpartition picks arbitrarily among scores tied with the k-th: redo those (rare) queries by row
        for q in np.flatnonzero((scores == kth).sum(1) > (sel_s == kth).sum(1)):
            above = np.flatnonzero(scores[q] > kth[q, 0])
            tied = np.flatnonzero(scores[q] == kth[q, 0])
            tied = tied[np.argsort(rows[q, tied], kind="stable")][:k - len(above)]
            keep = np.concatenate([above, tied])
            sel_s[q], sel_r[q] = scores[q, keep], rows[q, keep]
        scores, rows = sel_s, sel_r
    order = np.lexsort((rows, -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def exact_search(chunks, queries: np.ndarray, k: int) -> tuple:
    """Top-k rows by inner product for every query, exactly: (scores (Q, k), rows (Q, k)), best first.

    ``chunks``: an iterable of (first row, (n, E) array), as :meth:`Collection.chunks` gives; or one (N, E) array.
    Ties are broken by the lower row. Memory: one chunk's (Q, n) scores at a time.
    """
    if isinstance(chunks, np.ndarray):
        chunks = [(0, chunks)]
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.empty((q.shape[0], 0), np.float32)
    best_r = np.empty((q.shape[0], 0), np.int64)
    for first, chunk in chunks:
        s = np.ascontiguousarray((np.asarray(chunk, dtype=np.float32) @ q.T).T)  # (Q, n)
        r = np.broadcast_to(np.arange(first, first + s.shape[1], dtype=np.int64), s.shape)  # a view, no copy
        cand_s, cand_r = _topk(s, r, k)
        best_s, best_r = _topk(np.concatenate([best_s, cand_s], 1), np.concatenate([best_r, cand_r], 1), k)
    return best_s, best_r


# ---------------------------------------------------------------------------------------------- FAISS
def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise SearchError("FAISS is not installed: pip install faiss-cpu (or faiss-gpu), or use the exact search "
                          "(--engine exact)") from e
    return faiss


def build_faiss_index(collection: Collection, kind: str = "hnsw", hnsw_m: int = 32, ef_construction: int = 200,
                      nlist: Optional[int] = None, out: Optional[Path] = None, train_rows: int = 200_000,
                      seed: int = 0):
    """Build a FAISS inner-product index over the collection and save it (index.faiss + index.json beside it).

    ``kind``: "flat" (exact, FAISS's BLAS), "hnsw" (graph; M=``hnsw_m``), "ivf" (inverted lists; ``nlist``
    defaults to about 4*sqrt(N)), or a faiss factory string. Returns (index, metadata).
    """
    faiss = _faiss()
    n, d = len(collection), collection.embed_dim
    t0 = time.perf_counter()
    params: dict = {}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        params = {"M": hnsw_m, "efConstruction": ef_construction}
    elif kind == "ivf":
        nlist = int(nlist or max(1, min(int(4 * math.sqrt(n)), n // 39 or 1)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        params = {"nlist": nlist}
    else:
        try:
            index = faiss.index_factory(d, kind, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise SearchError(f"--build-index {kind!r} is neither flat, hnsw, ivf nor a faiss factory string "
                              f"({str(e).splitlines()[0][:200]})") from e
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(n, size=min(n, train_rows), replace=False))
        sample = collection.take(take) if n > train_rows else \
            np.concatenate([np.asarray(c, np.float32) for _, c in collection.chunks()])
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    for _, chunk in collection.chunks():
        index.add(np.ascontiguousarray(chunk, dtype=np.float32))
    meta = {"kind": kind, "params": params, "rows": n, "embed_dim": d, "config_hash": collection.config_hash,
            "manifest_sha256": collection.manifest_sha256, "faiss_version": faiss.__version__,
            "build_seconds": round(time.perf_counter() - t0, 3)}
    folder = Path(out or collection.folder)
    from utils.io import atomic_path, atomic_write

    with atomic_path(folder / INDEX_FILE, what="index") as tmp:  # faiss writes to a file name
        faiss.write_index(index, str(tmp))
    atomic_write(folder / INDEX_META, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    return index, meta


def load_faiss_index(collection: Collection):
    """(index, metadata) saved beside the collection; SearchError when missing or out of date."""
    meta_path, path = collection.folder / INDEX_META, collection.folder / INDEX_FILE
    if not meta_path.is_file() or not path.is_file():
        raise SearchError(f"{collection.folder} has no FAISS index: build one with --build-index hnsw")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    stale = [f"{what}: index {meta.get(key)!r}, export {now!r}" for what, key, now in
             (("rows", "rows", len(collection)), ("manifest", "manifest_sha256", collection.manifest_sha256),
              ("config hash", "config_hash", collection.config_hash)) if meta.get(key) != now]
    if stale:
        raise SearchError(f"{path} does not match the export any more ({'; '.join(stale)}): rebuild it with "
                          f"--build-index {meta.get('kind', 'hnsw')}")
    return _faiss().read_index(str(path)), meta


def faiss_search(index, queries: np.ndarray, k: int, ef_search: int = 128, nprobe: int = 32) -> tuple:
    """Top-k by the index: (scores (Q, k'), rows (Q, k')), best first, rows that the index did not fill dropped."""
    faiss = _faiss()
    inner = faiss.downcast_index(index)
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = max(ef_search, k)
    if hasattr(inner, "nprobe"):
        inner.nprobe = min(nprobe, getattr(inner, "nlist", nprobe))
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    keep = (rows >= 0).all(axis=0)
    return scores[:, keep], rows[:, keep].astype(np.int64)


# ---------------------------------------------------------------------------------------------- the model
def query_model(collection: Collection, model: Optional[str] = None, device: str = "cpu", trust: bool = False):
    """The model that made the export, loaded with its settings; refuses another model."""
    from features import identity_for_hash, load_model

    made_by = collection.config.get("model") or {}
    settings = collection.config.get("settings") or {}
    source = model or made_by.get("source")
    if not source:
        raise SearchError(f"{collection.folder / CONFIG} does not name the model of the export: pass --model")
    try:
        encoder = load_model(source, device=device, num_frames=settings.get("num_frames"),
                             input_size=settings.get("input_size"), num_clips=int(settings.get("num_clips", 1)),
                             num_crops=int(settings.get("num_crops", 1)),
                             image_tmpl=settings.get("image_tmpl", "img_{:05d}.jpg"),
                             index_start=int(settings.get("index_start", 1)), trust=trust,
                             test_rules=settings.get("test_rules", "published"))
    except FileNotFoundError as e:
        if model:
            raise
        raise SearchError(f"the model that made the export, {source}, is not there any more ({e}); pass --model with "
                          f"it (SHA-256 {made_by.get('sha256')})") from e
    want, got = identity_for_hash(made_by), identity_for_hash(encoder.identity)
    if want != got:
        raise SearchError(f"{collection.folder} was made with {made_by.get('source')} (SHA-256 {made_by.get('sha256')}), "
                          f"but the model given is {source} (SHA-256 {encoder.identity.get('sha256')}): embeddings "
                          f"of different models cannot be compared. Use the export's model, or export again")
    return encoder


# ---------------------------------------------------------------------------------------------- searching
def _parse_row(spec: str) -> Optional[int]:
    if spec.startswith(("row:", "#")):
        try:
            return int(spec.split(":", 1)[1] if spec.startswith("row:") else spec[1:])
        except ValueError:
            raise SearchError(f"--like {spec!r}: expected row:N with a row number") from None
    return None


def search(collection: Collection, texts: Sequence[str] = (), likes: Sequence[str] = (), k: int = 10,
           model: Optional[str] = None, engine: str = "auto", device: str = "cpu", ef_search: int = 128,
           nprobe: int = 32, trust: bool = False) -> dict:
    """Run text and video queries; returns the result dict that --json prints."""
    if k < 1:
        raise SearchError(f"-k must be >= 1, got {k}")
    if not texts and not likes:
        raise SearchError("nothing to search for: give text queries, --queries FILE or --like VIDEO")
    timing: dict = {}
    encoder = None
    # text queries first, then the videos; a video of the export is its stored row (left out of its own results)
    described = [{"kind": "text", "query": t} for t in texts]
    exclude: list = [None] * len(texts)
    stored: dict = {}
    for spec in likes:
        row = _parse_row(spec)
        row = collection.find(spec) if row is None else row
        if row is None and not os.path.exists(spec):
            raise SearchError(f"--like {spec}: not a video of the export and no such file or folder")
        if row is not None:
            stored[len(described)] = collection.vector(row)
        described.append({"kind": "video", "query": spec, "row": row})
        exclude.append(row)
    new_videos = [i for i, q in enumerate(described) if q["kind"] == "video" and q["row"] is None]
    queries: list = [None] * len(described)
    queries_from = dict(stored)
    t0 = time.perf_counter()
    if texts or new_videos:
        encoder = query_model(collection, model, device=device, trust=trust)
        timing["load_model"] = time.perf_counter() - t0
    if texts:
        t1 = time.perf_counter()
        queries_from.update(enumerate(encoder.encode_texts(list(texts)).numpy()))
        timing["encode_texts"] = time.perf_counter() - t1
    if new_videos:
        t1 = time.perf_counter()
        emb = encoder.encode_videos([described[i]["query"] for i in new_videos]).numpy()
        queries_from.update(zip(new_videos, emb))
        timing["encode_videos"] = time.perf_counter() - t1
    queries = [queries_from[i] for i in range(len(described))]
    Q = np.stack(queries).astype(np.float32)
    if Q.shape[1] != collection.embed_dim:
        raise SearchError(f"query embeddings have {Q.shape[1]} dimensions, the export {collection.embed_dim}")
    want = min(len(collection), k + (1 if any(e is not None for e in exclude) else 0))
    used = "exact"
    t1 = time.perf_counter()
    if engine in ("auto", "faiss"):
        try:
            index, meta = load_faiss_index(collection)
            scores, rows = faiss_search(index, Q, want, ef_search=ef_search, nprobe=nprobe)
            used = f"faiss:{meta['kind']}"
        except SearchError as e:
            if engine == "faiss":
                raise
            if (collection.folder / INDEX_META).is_file():
                logger.warning("%s; using the exact search", e)
            scores, rows = exact_search(collection.chunks(), Q, want)
    else:
        scores, rows = exact_search(collection.chunks(), Q, want)
    timing["search"] = time.perf_counter() - t1
    results = []
    for q, sc, rw, ex in zip(described, scores, rows, exclude):
        hits = [(float(s), int(r)) for s, r in zip(sc, rw) if r != ex][:k]
        results.append({**q, "results": [{"rank": i + 1, "score": round(s, 6), **collection.describe_row(r)}
                                         for i, (s, r) in enumerate(hits)]})
    return {"index": str(collection.folder), "rows": len(collection), "engine": used, "k": k,
            "model": encoder.describe() if encoder else (collection.config.get("model") or {}).get("source"),
            "queries": results, "seconds": {key: round(v, 4) for key, v in timing.items()}}


def format_results(result: dict, class_names: Optional[list] = None) -> str:
    lines = [f"index: {result['index']} ({result['rows']} rows, {result['engine']} search)"]
    for q in result["queries"]:
        lines += ["", f"{q['kind']} query: {q['query']}"]
        rows = q["results"]
        shown = [r.get("path") or r.get("text") or "" for r in rows]
        labels = [r.get("label", r.get("class_id")) for r in rows]
        names = [class_names[lb] if class_names and isinstance(lb, int) and 0 <= lb < len(class_names) else
                 ("" if lb is None else str(lb)) for lb in labels]
        width = max([len("label")] + [len(n) for n in names])
        lines.append(f"{'rank':>4}  {'score':>7}  {'label':<{width}}  video")
        for r, what, name in zip(rows, shown, names):
            lines.append(f"{r['rank']:>4}  {r['score']:>7.4f}  {name:<{width}}  {what}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line
EXAMPLES = """examples:
  python extract_features.py demo_data/val.txt --root demo_data/frames --model demo_output/train/last.pt \\
      --out features/demo_val
  python search.py --index features/demo_val "a shape moving to the left" "a shape growing bigger" -k 5
  python search.py --index features/demo_val --like demo_data/frames/val/growing/growing_000 --classes demo_data/classes.csv
  python search.py --index features/demo_val --like row:0 --json
  python search.py --index features/big --build-index hnsw      # then searches use it (pip install faiss-cpu)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("queries", nargs="*", help="text queries")
    p.add_argument("--index", required=True, help="an extract_features.py export folder (--out)")
    p.add_argument("--queries", dest="queries_file", help="a text file of queries, one per non-empty line")
    p.add_argument("--like", action="append", default=[], metavar="VIDEO",
                   help="videos like this one: a video of the export (by path, or row:N) or any video file or frames "
                        "folder (repeatable)")
    p.add_argument("--top-k", "-k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--classes", help="class list CSV (id,name) to show label names")
    p.add_argument("--model", help="the export's model (default: the one export_config.json names)")
    p.add_argument("--engine", default="auto", choices=("auto", "exact", "faiss"),
                   help="auto: the FAISS index when one matches the export, else exact (default)")
    p.add_argument("--ef-search", type=int, default=128, help="HNSW search breadth (default 128)")
    p.add_argument("--nprobe", type=int, default=32, help="IVF lists visited per query (default 32)")
    p.add_argument("--build-index", metavar="KIND",
                   help="build a FAISS index in the export folder: hnsw, ivf, flat or a faiss factory string")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node (default 32)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default about 4*sqrt(rows))")
    p.add_argument("--device", default="cpu", help="device for the query model (default cpu)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that need full unpickling (can run code): only files you trust")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is loaded (to stderr)")
    return p


def main(argv=None) -> int:
    """Search (or build an index); returns the exit status (0, or 2 for bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    from datasets import SampleLoadError, load_class_list
    from utils.checkpoint import UnsafeCheckpointError

    try:
        collection = Collection.open(args.index)
        if args.build_index:
            _, meta = build_faiss_index(collection, args.build_index, hnsw_m=args.hnsw_m, nlist=args.nlist)
            print(f"built a FAISS {meta['kind']} index of {meta['rows']} rows in {meta['build_seconds']:.1f} s: "
                  f"{collection.folder / INDEX_FILE}")
            if not (args.queries or args.queries_file or args.like):
                return 0
        texts = list(args.queries)
        if args.queries_file:
            with open(args.queries_file, encoding="utf-8") as f:
                texts += [line.strip() for line in f if line.strip()]
        result = search(collection, texts, args.like, k=args.top_k, model=args.model, engine=args.engine,
                        device=args.device, ef_search=args.ef_search, nprobe=args.nprobe, trust=args.trust_checkpoint)
        names = load_class_list(args.classes) if args.classes else None
    except (SearchError, FileNotFoundError, ValueError, SampleLoadError, UnsafeCheckpointError, OSError) as e:
        print(f"search.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_results(result, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
