"""Smoke test of benchmarks/throughput.py: the tiny size, two repetitions, every contender, the table's columns."""
import json

import torch

from benchmarks import throughput


def test_throughput_main_prints_the_table_with_every_contender(tmp_path, capsys):
    threads = torch.get_num_threads()  # --threads 1 (steadier on a shared machine) must not leak into other tests
    try:
        _check_main(tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _check_main(tmp_path, capsys):
    out_json = tmp_path / "figures.json"
    result = throughput.main(["--size", "tiny", "--frames", "4", "--batch", "2", "--reps", "2", "--warmup", "1",
                              "--workers", "0", "--threads", "1", "--classes", "7", "--loader-videos", "4", "--source-frames", "6",
                              "--data-dir", str(tmp_path / "frames"), "--json", str(out_json)])
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("| contender"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(throughput.COLUMNS)
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == set(throughput.CONTENDERS)
    for name, r in rows.items():
        assert len(r["rates"]) == 2 and all(rate > 0 for rate in r["rates"]), name
        assert r["min"] <= r["median"] <= r["max"], name
        assert r["contender"] in printed, name
    # The ratios are the medians' ratios, and the floor is its own reference.
    assert rows["floor"]["vs_floor"] == 1.0
    assert abs(rows["t2l"]["vs_floor"] - rows["t2l"]["median"] / rows["floor"]["median"]) < 1e-9
    assert abs(rows["t2l"]["vs_xclip"] - rows["t2l"]["median"] / rows["xclip"]["median"]) < 1e-9
    # The classifiers are compared with each other, not with the encoders.
    zs = rows["t2l-classify"]["median"] / rows["xclip-classify"]["median"]
    assert abs(rows["t2l-classify"]["vs_xclip"] - zs) < 1e-9 and rows["t2l-classify"]["vs_floor"] is None
    # Units: inference in videos/s, training in steps/s (and videos/s = steps/s x batch), loading in clips/s.
    assert rows["t2l"]["unit"] == "videos/s" and rows["loader"]["unit"] == "clips/s"
    assert rows["train"]["unit"] == "steps/s" and rows["train"]["videos_per_s"] == rows["train"]["median"] * 2
    # A training step holds more than inference (gradients, the text tower): the memory column measures something.
    assert rows["train"]["peak_mib"] > rows["t2l"]["peak_mib"] > 0
    assert rows["loader"]["batch"] == 4 and rows["loader"]["peak_mib"] is None  # one pass over 4 clips
    assert "loading supplies" in printed and "T2L / floor" in printed
    # The end-to-end contenders: test.py's loop and train.py's epoch over the 4 generated videos, in videos/s.
    for name in ("test-e2e", "train-e2e"):
        assert rows[name]["unit"] == "videos/s" and rows[name]["batch"] == 4, name
    assert rows["train-e2e"]["vs_floor"] is None
    assert "train.py's epoch:" in printed and "test.py's loop:" in printed
    assert json.loads(out_json.read_text())["rows"][0]["name"] == "floor"


def test_xclip_zero_shot_contender_computes_what_xclip_forward_computes():
    """The X-CLIP classification contender must time X-CLIP's real zero-shot path, not a cheaper one."""
    from transformers import XCLIPModel

    size, T = throughput.SIZES["tiny"], 4
    torch.manual_seed(0)
    xclip = XCLIPModel._from_config(throughput.xclip_config(size, T), attn_implementation="sdpa").eval()
    gen = torch.Generator().manual_seed(1)
    tokens = throughput.random_tokens(5, size["context_length"], size["vocab_size"], gen)
    videos = torch.randn(3, T, 3, size["image_resolution"], size["image_resolution"], generator=gen)
    mask = (torch.arange(tokens.shape[1])[None] <= tokens.argmax(-1, keepdim=True)).long()
    with torch.no_grad():
        reference = xclip(input_ids=tokens, attention_mask=mask, pixel_values=videos).logits_per_video
        ours = throughput.xclip_zero_shot_logits(xclip, videos, throughput.xclip_text_embeddings(xclip, tokens))
    assert ours.shape == (3, 5)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_timeline_and_search_benchmarks_run_at_tiny_sizes(tmp_path, capsys):
    """benchmarks/timeline.py memory and benchmarks/search.py speed end to end at toy sizes: their figures are there,
    the generated video is deleted, and the exact search agrees with itself."""
    from benchmarks import search as search_bench
    from benchmarks import timeline as timeline_bench
    from conftest import save_tiny_t2l

    threads = torch.get_num_threads()
    try:
        ckpt = save_tiny_t2l(tmp_path / "tiny.pt")
        assert timeline_bench.main(["memory", "--model", str(ckpt), "--classes", "a,b,c", "--minutes", "0.1",
                                    "--work", str(tmp_path / "work"), "--threads", "1", "--json-out",
                                    str(tmp_path / "tl.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    figures = json.loads((tmp_path / "tl.json").read_text())
    assert figures["windows"] == 5 and figures["video"]["frames"] == 150 and 0 < figures["max_cached_frames"] <= 8
    assert figures["rss_at"] and not list((tmp_path / "work").glob("*.mp4"))
    assert search_bench.main(["--json-out", str(tmp_path / "s.json"), "speed", "--rows", "500", "--dim", "16",
                              "--faiss"]) == 0
    entry = json.loads((tmp_path / "s.json").read_text())["collections"][0]
    assert entry["rows"] == 500 and entry["exact_single_query_ms_median"] > 0
