"""The demo pipeline end to end on a tiny saved model: every step runs and the report holds every method."""

from __future__ import annotations

import json

import pytest
from test_cli import tiny_folder  # noqa: F401  (fixture)

import attnshare.report.demo
from attnshare.cli import main
from attnshare.errors import AttnshareError
from attnshare.report.demo import DemoConfig, Report, write_report
from attnshare.report.variants import Baseline, VariantRow


def test_demo_writes_a_report_with_every_method(tiny_folder, tmp_path, monkeypatch, capsys):  # noqa: F811
    folder, _ = tiny_folder
    cache = tmp_path / "cache"
    monkeypatch.setattr(attnshare.report.demo, "cache_dir", lambda: cache)  # the trained LiSA artifact is cached here
    out = tmp_path / "report"
    argv = ["demo", "--model", str(folder), "--out", str(out), "--ppl-tokens", "128", "--window", "64",
            "--proxy-items", "8", "--calib-tokens", "64", "--heldout-tokens", "32", "--kv-savings", "0.25",
            "--same-layers", "--lisa-fraction", "0.5", "--lisa-minutes", "0.02", "--ds-ratios", "0.3", "--bench-context", "16", "--bench-long-batch", "2", "--bench-long-context", "24",
            "--bench-new-tokens", "4", "--bench-repeats", "1"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    methods = [v["method"] for v in results["variants"]]
    assert methods == ["sa", "drop", "layerdrop", "lisa", "directshare"]
    for row in results["variants"][:3]:  # L = 4: 2 SA receivers, or 1 layer's attention, or 1 block
        assert row["kv_saved"] == pytest.approx(0.25)
    assert results["variants"][4]["params_saved"] > 0
    report = (out / "report.md").read_text()
    assert "## Speed and memory" in report and "| lisa 0.5 |" in report
    assert "### At equal KV cache saved" in report and "(baseline)" in report and "Same layers" in report
    for image in ("pareto_kv_saved.png", "pareto_params_saved.png"):
        assert (out / image).stat().st_size > 1000 and f"]({image})" in report
    assert list((out / "analysis").glob("*.png"))
    assert list(cache.glob("demo/lisa-*/attnshare.json"))  # a second run reuses the trained artifact
    capsys.readouterr()
    assert main(argv) == 0
    assert "cached artifact" in (out / "report.md").read_text()
    for stale in cache.glob("demo/lisa-*/attnshare.json"):  # a cache from an incompatible version is retrained
        stale.write_text("{}")
    assert main(argv) == 0
    assert "cached artifact" not in (out / "report.md").read_text()


@pytest.mark.parametrize("items", [0, 16])
def test_demo_report_shows_the_proxy_column_only_when_measured(items, tmp_path):
    report = Report(DemoConfig(out=str(tmp_path), proxy_items=items))
    proxies = {"next_sentence": 0.5} if items else {}
    report.base = Baseline(20.0, 1000, 64.0, proxies)
    report.variants.append(VariantRow("drop 1", "drop", "drop: 1 layer", 22.0, 1.1, 900, 0.1, 48.0, 0.25,
                                      proxies=proxies))
    text = write_report(report).read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 4 and all(line.count("|") == (9 if items else 8) for line in table)
    assert ("next-sentence acc" in table[0]) == bool(items) and ("| 50.0% |" in table[3]) == bool(items)
    assert ("±24 points" in text) == bool(items) and ("accuracy is off" in text) == (not items)


def test_demo_refuses_bad_settings():
    with pytest.raises(AttnshareError, match="lisa-fraction"):
        DemoConfig(lisa_fraction=1.5)
    with pytest.raises(AttnshareError, match="ppl-tokens"):
        DemoConfig(ppl_tokens=10, window=64)
    with pytest.raises(AttnshareError, match="must divide --bench-long-batch 4"):
        DemoConfig(bench_prefill_batch=3)
