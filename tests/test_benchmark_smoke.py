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
                              "--workers", "0", "--threads", "1", "--loader-videos", "4", "--source-frames", "6",
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
    # Units: inference in videos/s, training in steps/s (and videos/s = steps/s x batch), loading in clips/s.
    assert rows["t2l"]["unit"] == "videos/s" and rows["loader"]["unit"] == "clips/s"
    assert rows["train"]["unit"] == "steps/s" and rows["train"]["videos_per_s"] == rows["train"]["median"] * 2
    # A training step holds more than inference (gradients, the text tower): the memory column measures something.
    assert rows["train"]["peak_mib"] > rows["t2l"]["peak_mib"] > 0
    assert rows["loader"]["batch"] == 4 and rows["loader"]["peak_mib"] is None  # one pass over 4 clips
    assert "loading supplies" in printed and "T2L / floor" in printed
    assert json.loads(out_json.read_text())["rows"][0]["name"] == "floor"
