"""Measurements of search.py (not tests: run once, record the figures in docs/FEATURES.md).

    # retrieval quality on an export of the demo's validation videos (extract_features.py --out features/demo_val)
    python benchmarks/search.py map --index features/demo_val --descriptions demo_data/descriptions.csv
    # exact vs FAISS top-10 on 10k vectors, and query latency on 100k (synthetic, clustered, 512-d like ViT-B/16)
    OMP_NUM_THREADS=1 python benchmarks/search.py speed --rows 10000 100000 --dim 512

map: every class description is a text query over the export's videos; the videos of that class are the relevant
ones; average precision per query, mean over the classes (mAP). The same for video queries ("more like this"):
every video against all the others, relevant = same class. Chance level: the fraction of relevant videos.

speed: vectors drawn around 1,000 random centres on the sphere (a spread of about 0.35 rad per coordinate
direction), L2-normalised, as embeddings of a large video collection are: clustered, not uniform. Queries: 200
vectors from the same mixture, not in the collection. Exact = search.exact_search (numpy, chunks of 10k rows, as
shards are read); FAISS = HNSW (M 32, efConstruction 200, efSearch 128) and IVF (nlist about 4*sqrt(N), at most
N/39, nprobe 32): search.py's defaults.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import search  # noqa: E402
from benchmarks.report import emit  # noqa: E402


def average_precision(relevant: np.ndarray) -> float:
    """AP of one ranking; ``relevant``: booleans in rank order (all items ranked)."""
    hits = np.cumsum(relevant)
    if hits[-1] == 0:
        return 0.0
    precision_at_hits = hits[relevant] / (np.flatnonzero(relevant) + 1)
    return float(precision_at_hits.mean())


def retrieval_map(args) -> dict:
    from features import read_class_texts

    collection = search.Collection.open(args.index)
    labels = np.array([e["label"] for e in collection.entries])
    classes = read_class_texts(args.descriptions)
    n = len(collection)
    result = search.search(collection, [t for t in classes.texts[0]], k=n, model=args.model)
    per_class = {}
    for k, q in enumerate(result["queries"]):
        ranked = np.array([labels[r["row"]] == k for r in q["results"]])
        per_class[classes.names[k]] = round(100 * average_precision(ranked), 2)
    emb = np.concatenate([np.asarray(c, np.float32) for _, c in collection.chunks()])
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    video_ap = []
    for i in range(n):
        order = np.lexsort((np.arange(n), -sims[i]))[:-1]  # the query itself (at -inf) last, then dropped
        video_ap.append(average_precision(labels[order] == labels[i]))
    by_class = {classes.names[k]: round(100 * float(np.mean([video_ap[i] for i in np.flatnonzero(labels == k)])), 2)
                for k in range(len(classes.names))}
    return {"index": args.index, "videos": n, "classes": len(classes.names),
            "text_queries": {"mAP": round(float(np.mean(list(per_class.values()))), 2), "per_class_AP": per_class},
            "video_queries": {"mAP": round(100 * float(np.mean(video_ap)), 2), "per_class_mAP": by_class},
            "chance_AP": round(100 * float(np.mean([np.mean(labels == k) for k in range(len(classes.names))])), 2),
            "model": result["model"]}


def clustered(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray, spread: float = 0.35) -> np.ndarray:
    c = centres[rng.integers(0, len(centres), n)]
    x = c + spread * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def same_top(exact_rows, exact_scores, other_rows, other_scores, tol: float = 1e-5) -> tuple:
    """(identical rank by rank, same up to ties) counts: a swap of rows whose exact scores agree within tol is a tie."""
    strict = tie_aware = 0
    for er, es, orr, os_ in zip(exact_rows, exact_scores, other_rows, other_scores):
        if len(orr) == len(er) and (er == orr).all():
            strict += 1
            tie_aware += 1
            continue
        if len(orr) == len(er) and np.allclose(es, os_, atol=tol) and \
                set(er[es > es[-1] + tol]) <= set(orr):
            tie_aware += 1
    return strict, tie_aware


def speed(args) -> dict:
    if args.faiss:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = {"dim": args.dim, "threads": args.threads, "faiss": faiss.__version__ if args.faiss else None,
           "collections": []}
    queries = clustered(200, args.dim, rng, centres)
    for n in args.rows:
        data = clustered(n, args.dim, rng, centres)
        chunks = [(i, data[i:i + 10_000]) for i in range(0, n, 10_000)]
        entry: dict = {"rows": n}
        t0 = time.perf_counter()
        es, er = search.exact_search(chunks, queries, 10)
        entry["exact_batch200_ms_per_query"] = round(1000 * (time.perf_counter() - t0) / len(queries), 3)
        single = []
        for q in queries[:50]:
            t0 = time.perf_counter()
            search.exact_search(chunks, q[None], 10)
            single.append(time.perf_counter() - t0)
        entry["exact_single_query_ms_median"] = round(1000 * float(np.median(single)), 3)
        for kind in args.faiss:
            t0 = time.perf_counter()
            if kind == "hnsw":
                index = faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = 200
            else:
                nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))  # search.py's default
                index = faiss.IndexIVFFlat(faiss.IndexFlatIP(args.dim), args.dim, nlist, faiss.METRIC_INNER_PRODUCT)
                index.train(data)
            index.add(data)
            build = time.perf_counter() - t0
            fs, fr = search.faiss_search(index, queries, 10)
            single = []
            for q in queries[:50]:
                t0 = time.perf_counter()
                search.faiss_search(index, q[None], 10)
                single.append(time.perf_counter() - t0)
            strict, ties = same_top(er, es, fr, fs)
            entry[kind] = {"build_s": round(build, 2), "single_query_ms_median": round(1000 * float(np.median(single)), 3),
                           "same_top10_rank_by_rank": f"{strict}/{len(queries)}",
                           "same_top10_up_to_ties": f"{ties}/{len(queries)}"}
        out["collections"].append(entry)
        print(json.dumps(entry), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("map", help="mean average precision of text and video queries on a labelled export")
    m.add_argument("--index", required=True)
    m.add_argument("--descriptions", required=True, help="descriptions CSV of the export's classes, in label order")
    m.add_argument("--model", default=None)
    s = sub.add_parser("speed", help="exact vs FAISS agreement and latency on synthetic collections")
    s.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    s.add_argument("--dim", type=int, default=512)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--faiss", nargs="*", default=["hnsw", "ivf"], choices=("hnsw", "ivf"),
                   help="FAISS indexes to compare (none: the exact search alone)")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    return emit(retrieval_map(args) if args.what == "map" else speed(args), args.json_out)


if __name__ == "__main__":
    sys.exit(main())
