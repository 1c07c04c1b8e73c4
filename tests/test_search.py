"""Tests of search.py: text and video queries over an extract_features.py export, exact and FAISS.

The exact search must return what a brute-force cosine ranking of every row gives (across shards, ties by row);
a video query leaves itself out; a model other than the export's is refused; FAISS (optional: the tests that need
it skip without it) gives the same top-10 as the exact search on 10k clustered vectors, and an index that no longer
matches its export is not used.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Dataset_creation_scripts"))

import extract_features  # noqa: E402
import search  # noqa: E402
from features import load_model  # noqa: E402
from conftest import save_tiny_t2l  # noqa: E402
QUERIES = ["a shape moving to the left", "a shape growing bigger", "an elongated shape turning like a clock hand"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_t2l(tmp_path_factory.mktemp("ckpt") / "tiny.pt", perturb_seed=100)


@pytest.fixture(scope="module")
def export(tmp_path_factory, ckpt):
    """The demo's validation videos (3 per class, 24 .mp4 files) exported in shards of 5 rows, under the test rules
    that are not the default (so that a query video encoded under other rules would not match its copy)."""
    import make_synthetic_demo

    data = tmp_path_factory.mktemp("demo")
    assert make_synthetic_demo.main([str(data), "--train-per-class", "1", "--val-per-class", "3", "--no-extract",
                                     "--no-progress", "--workers", "1"]) == 0
    out = tmp_path_factory.mktemp("features") / "val"
    assert extract_features.main([str(data / "videos" / "val"), "--model", str(ckpt), "--out", str(out),
                                  "--shard-size", "5", "--workers", "0", "--threads", "1", "--no-progress",
                                  "--rules", "centre"]) == 0
    return data, out


def brute_force(out: Path, queries: np.ndarray):
    emb = np.concatenate([np.load(p) for p in sorted(out.glob("shard_*.npy"))])
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return emb, rows, queries @ emb.T


def run(capsys, *args):
    rc = search.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_text_queries_rank_every_row_by_cosine_across_shards(export, ckpt, capsys):
    data, out = export
    rc, stdout, err = run(capsys, "--index", out, *QUERIES, "-k", "7", "--json")
    assert rc == 0, err
    result = json.loads(stdout)
    assert result["engine"] == "exact" and result["rows"] == 24 and len(list(out.glob("shard_*.npy"))) == 5
    text = load_model(ckpt, device="cpu").encode_texts(QUERIES).numpy()
    emb, rows, sims = brute_force(out, text)
    for q, s in zip(result["queries"], sims):
        assert q["kind"] == "text" and len(q["results"]) == 7
        order = np.lexsort((np.arange(len(s)), -s))[:7]
        assert [r["row"] for r in q["results"]] == order.tolist()
        np.testing.assert_allclose([r["score"] for r in q["results"]], s[order], atol=1e-6)
        assert [r["path"] for r in q["results"]] == [rows[i]["path"] for i in order]
    # the human-readable table names the label of each hit when given the class list
    rc, stdout, err = run(capsys, "--index", out, QUERIES[0], "-k", "2", "--classes", data / "classes.csv")
    assert rc == 0 and "text query: a shape moving to the left" in stdout and stdout.count(".mp4") == 2


def test_more_like_this_by_path_row_or_new_file(export, ckpt, capsys, tmp_path):
    data, out = export
    emb, rows, _ = brute_force(out, np.zeros((1, 32), np.float32))
    target = 9
    path = rows[target]["path"]
    rc, stdout, err = run(capsys, "--index", out, "--like", path, "--like", f"row:{target}", "--json", "-k", "5")
    assert rc == 0, err
    sims = emb @ emb[target]
    sims[target] = -np.inf  # a video is not "like itself": left out
    expected = np.lexsort((np.arange(len(sims)), -sims))[:5].tolist()
    for q in json.loads(stdout)["queries"]:
        assert q["row"] == target and [r["row"] for r in q["results"]] == expected
    # the end of an exported path is enough
    tail = "/".join(Path(path).parts[-2:])
    rc, stdout, err = run(capsys, "--index", out, "--like", tail, "--json", "-k", "5")
    assert rc == 0 and [r["row"] for r in json.loads(stdout)["queries"][0]["results"]] == expected
    # a video the export does not hold is encoded with the export's model and settings: a copy finds its original
    copy = tmp_path / "copy.mp4"
    shutil.copy(path, copy)
    rc, stdout, err = run(capsys, "--index", out, "--like", copy, "--json", "-k", "3")
    assert rc == 0, err
    top = json.loads(stdout)["queries"][0]["results"][0]
    assert top["row"] == target and top["score"] == pytest.approx(1.0, abs=1e-5)


def test_another_model_or_a_bad_export_is_refused(export, tmp_path, capsys):
    data, out = export
    other = save_tiny_t2l(tmp_path / "other.pt", seed=1, perturb_seed=101)
    rc, stdout, err = run(capsys, "--index", out, "juggling", "--model", other)
    assert rc == 2 and "cannot be compared" in err and "other.pt" in err
    rc, stdout, err = run(capsys, "--index", tmp_path / "nothing", "juggling")
    assert rc == 2 and "not an extract_features.py export" in err
    rc, stdout, err = run(capsys, "--index", out, "--like", "no/such/video.mp4")
    assert rc == 2 and "not a video of the export" in err
    rc, stdout, err = run(capsys, "--index", out)
    assert rc == 2 and "nothing to search for" in err


def fake_export(folder: Path, emb: np.ndarray, shard_size: int, config_hash: str = "abc") -> Path:
    """An export folder made by hand (shards, manifest, config) around given embeddings."""
    folder.mkdir(parents=True)
    lines = []
    for s, i in enumerate(range(0, len(emb), shard_size)):
        np.save(folder / f"shard_{s:05d}.npy", emb[i:i + shard_size])
        lines += [json.dumps({"path": f"v{i + r}.mp4", "label": None, "shard": s, "row": r})
                  for r in range(len(emb[i:i + shard_size]))]
    (folder / "manifest.jsonl").write_text("".join(line + "\n" for line in lines))
    (folder / "export_config.json").write_text(json.dumps({"config_hash": config_hash, "model": {}}))
    return folder


def clustered(n, dim, rng, centres):
    """Unit vectors around unit centres (cosine about 0.9 to their centre), as embeddings of many videos are."""
    centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_search_merges_shards_and_skips_incomplete_ones(tmp_path, caplog):
    rng = np.random.default_rng(0)
    emb = clustered(230, 16, rng, rng.standard_normal((5, 16)))
    queries = clustered(7, 16, rng, emb[:3])
    folder = fake_export(tmp_path / "x", emb, shard_size=50)
    col = search.Collection.open(folder)
    scores, rows = search.exact_search(col.chunks(), queries, 12)
    full = queries @ emb.T
    for q in range(7):
        order = np.lexsort((np.arange(230), -full[q]))[:12]
        assert rows[q].tolist() == order.tolist()
        np.testing.assert_allclose(scores[q], full[q, order], rtol=0, atol=1e-6)
    # the same video exported under several names: equal scores, the lower rows first, across shard boundaries
    # (small integers, so that every dot product is exact whatever the summation order)
    dup = rng.integers(-3, 4, (230, 16)).astype(np.float32)
    dup[[48, 49, 120, 229]] = dup[7]
    scores, rows = search.exact_search([(i, dup[i:i + 50]) for i in range(0, 230, 50)], dup[7][None] * 9, 3)
    assert rows[0].tolist() == [7, 48, 49] and len(set(scores[0].tolist())) == 1
    # a shard with one manifest line missing (a run killed between shard and manifest) is left out
    lines = (folder / "manifest.jsonl").read_text().splitlines(keepends=True)
    (folder / "manifest.jsonl").write_text("".join(lines[:-1]))
    col = search.Collection.open(folder)
    assert len(col) == 200 and "shard 4 is incomplete" in caplog.text


def test_take_gathers_rows_across_shards(tmp_path):
    rng = np.random.default_rng(2)
    emb = clustered(230, 16, rng, rng.standard_normal((5, 16)))
    col = search.Collection.open(fake_export(tmp_path / "x", emb, shard_size=50))
    rows = np.array([229, 0, 49, 50, 120, 7, 200, 199])  # any order, on both sides of shard boundaries
    assert col.take(rows).dtype == np.float32
    np.testing.assert_array_equal(col.take(rows), emb[rows])
    np.testing.assert_array_equal(col.vector(50), emb[50])
    with pytest.raises(search.SearchError, match="out of range"):
        col.vector(230)


def test_faiss_index_gives_the_exact_top10_on_10k_vectors(tmp_path):
    faiss = pytest.importorskip("faiss", reason="FAISS is optional (pip install faiss-cpu); the exact search is used")
    faiss.omp_set_num_threads(1)  # a deterministic graph
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((100, 64))
    emb = clustered(10_000, 64, rng, centres)
    queries = clustered(200, 64, rng, centres)
    col = search.Collection.open(fake_export(tmp_path / "big", emb, shard_size=3000))
    exact_s, exact_r = search.exact_search(col.chunks(), queries, 10)
    index, meta = search.build_faiss_index(col, "hnsw")
    assert meta["rows"] == 10_000 and (tmp_path / "big" / "index.faiss").is_file()
    index, _ = search.load_faiss_index(col)  # as saved
    faiss_s, faiss_r = search.faiss_search(index, queries, 10, ef_search=256)
    assert (faiss_r == exact_r).all(), f"{(faiss_r != exact_r).any(axis=1).sum()} of 200 queries differ"
    np.testing.assert_allclose(faiss_s, exact_s, atol=1e-5)
    # flat and ivf with every list probed are exact too
    for kind in ("flat", "ivf"):
        index, meta = search.build_faiss_index(col, kind)
        s, r = search.faiss_search(index, queries, 10, nprobe=10_000)
        assert (r == exact_r).all(), kind
    # trained on a sample of the rows (train_rows < rows): still exact with every list probed
    index, meta = search.build_faiss_index(col, "ivf", train_rows=4000)
    s, r = search.faiss_search(index, queries, 10, nprobe=10_000)
    assert (r == exact_r).all()


def test_search_uses_a_matching_index_and_not_a_stale_one(export, tmp_path, capsys, caplog):
    pytest.importorskip("faiss", reason="FAISS is optional (pip install faiss-cpu); the exact search is used")
    data, out = export
    folder = tmp_path / "val"
    shutil.copytree(out, folder)
    rc, stdout, err = run(capsys, "--index", folder, "--build-index", "flat")
    assert rc == 0 and "built a FAISS flat index of 24 rows" in stdout
    rc, exact, _ = run(capsys, "--index", folder, *QUERIES, "--engine", "exact", "--json")
    rc, auto, err = run(capsys, "--index", folder, *QUERIES, "--json")
    assert rc == 0, err
    auto, exact = json.loads(auto), json.loads(exact)
    assert auto["engine"] == "faiss:flat"
    for a, b in zip(auto["queries"], exact["queries"]):
        assert [r["row"] for r in a["results"]] == [r["row"] for r in b["results"]]
    # the export grew (a manifest line fewer here: another manifest): the index is stale
    lines = (folder / "manifest.jsonl").read_text().splitlines(keepends=True)
    (folder / "manifest.jsonl").write_text("".join(lines[:-4]))
    rc, stdout, err = run(capsys, "--index", folder, QUERIES[0], "--json")
    assert rc == 0 and json.loads(stdout)["engine"] == "exact" and "does not match the export" in caplog.text
    rc, stdout, err = run(capsys, "--index", folder, QUERIES[0], "--engine", "faiss")
    assert rc == 2 and "rebuild it with --build-index flat" in err


def test_without_faiss_the_index_commands_say_how_to_get_it(export, tmp_path, capsys, monkeypatch):
    data, out = export
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    rc, stdout, err = run(capsys, "--index", out, "--build-index", "hnsw")
    assert rc == 2 and "pip install faiss-cpu" in err
    rc, stdout, err = run(capsys, "--index", out, QUERIES[0], "--json")  # auto: exact, silently
    assert rc == 0 and json.loads(stdout)["engine"] == "exact"
