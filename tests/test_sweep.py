"""Budget sweeps: SA's nested greedy curve equals separate plans, and `attnshare sweep` measures every value."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model
from test_cli import tiny_folder  # noqa: F401  (fixture)

import attnshare
from attnshare.cli import main
from attnshare.methods.sa import SAConfig
from attnshare.methods.sa.planner import plan_sa

SMALL = {"calib_tokens": 64, "calib_seq_len": 32, "heldout_tokens": 32, "shortlist": 5}


def test_sa_budget_curve_is_nested_and_equals_separate_plans():
    model = tiny_model("llama", num_layers=6)
    configs = [SAConfig(budget=b, align_heads=True, **SMALL) for b in (1, 2, 3)]
    curve = attnshare.get_method("sa").make_plans(model, configs)
    assert [len(p.donors) for p in curve] == [1, 2, 3]
    assert set(curve[0].receivers) <= set(curve[1].receivers) <= set(curve[2].receivers)
    for config, plan in zip(configs, curve):
        assert plan.to_dict() == plan_sa(model, config, progress=False).to_dict()


def test_sweep_cli_measures_each_budget(tiny_folder, tmp_path, capsys):  # noqa: F811
    folder, text = tiny_folder
    out = tmp_path / "sweep.json"
    argv = ["sweep", "--model", str(folder), "--method", "sa", "--vary", "budget", "--values", "1", "2",
            "--calib-tokens", "64", "--calib-seq-len", "32", "--heldout-tokens", "32",
            "--text", str(text), "--window", "64", "--max-tokens", "256", "--json", str(out),
            "--plot", str(tmp_path / "sweep.png")]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["budget=1", "budget=2"]
    # each SA receiver drops its K cache: 1/(2L) of the KV cache per receiver, L = 4
    assert [r["kv_saved"] for r in rows] == pytest.approx([1 / 8, 2 / 8])
    assert rows[0]["params_saved"] > 0 and (tmp_path / "sweep.png").stat().st_size > 0
