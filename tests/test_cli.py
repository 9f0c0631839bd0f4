"""CLI end to end on a tiny saved model: apply -> artifact -> eval / generate (bad input: test_cli_errors.py)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model
from test_foundation import _tiny_tokenizer

from attnshare.cli import main


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 40)
    return folder, text


def test_apply_then_eval_and_generate_from_artifact(tiny_folder, tmp_path, capsys):
    folder, text = tiny_folder
    art = tmp_path / "art"
    assert main(["apply", "--model", str(folder), "--method", "sa", "--receivers", "2", "3", "--out", str(art)]) == 0
    meta = json.loads((art / "attnshare.json").read_text())
    assert meta["plans"][0]["donors"] == {"2": 1, "3": 1}
    assert main(["eval", "--model", str(art), "--text", str(text), "--window", "64", "--max-tokens", "256",
                 "--proxy-items", "0", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["perplexity"]["windows"] == 4
    capsys.readouterr()
    assert main(["generate", "--model", str(art), "--prompt", "abc", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("abc")


def test_generate_compiled_writes_what_eager_writes(tiny_folder, tmp_path, capsys):
    """``--compile``: a static cache and a compiled decode step give the same greedy text."""
    folder, _ = tiny_folder
    art = tmp_path / "art"
    assert main(["apply", "--model", str(folder), "--method", "sa", "--receivers", "2", "3", "--out", str(art)]) == 0
    texts = []
    for extra in ([], ["--compile"]):
        capsys.readouterr()
        assert main(["generate", "--model", str(art), "--prompt", "abc", "--max-new-tokens", "6", *extra]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("abc")


def test_train_cli_heals_and_writes_an_artifact(tiny_folder, tmp_path):
    folder, text = tiny_folder
    art = tmp_path / "healed"
    argv = ["train", "--model", str(folder), "--method", "sa", "--receivers", "3", "--text", str(text),
            "--seq-len", "32", "--batch-size", "2", "--max-steps", "3", "--no-progress", "--out", str(art)]
    assert main(argv) == 0
    meta = json.loads((art / "attnshare.json").read_text())
    assert meta["tensors"] and all(".3.self_attn." in t for t in meta["tensors"])
    report = json.loads((art / "train.json").read_text())
    assert report["steps"] == 3 and len(report["losses"]) == 3
    assert (tmp_path / "healed-checkpoints").is_dir()  # beside the artifact, which stays small


def test_train_cli_distils_lisa_on_teacher_samples(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSHARE_CACHE", str(tmp_path / "cache"))
    folder, _ = tiny_folder
    art = tmp_path / "lisa"
    argv = ["train", "--model", str(folder), "--method", "lisa", "--layers", "2", "3", "--init", "permutation", "--no-align-heads",
            "--local-steps", "2", "--text", "teacher", "--teacher-tokens", "64", "--seq-len", "16", "--batch-size",
            "2", "--max-steps", "2", "--no-progress", "--out", str(art)]
    assert main(argv) == 0
    report = json.loads((art / "train.json").read_text())
    assert report["steps"] == 2 and report["local_steps"] == 2
    assert len(list((tmp_path / "cache" / "samples").glob("*.safetensors"))) == 1  # 4 blocks of 16, drawn once


def test_no_progress_hides_every_bar_of_the_command(tiny_folder, tmp_path, capsys, monkeypatch):
    """``--no-progress`` reaches the planner too (its calibration, sensitivity and fit bars), and transformers'
    weight-loading bar: nothing of a bar on stderr. Without it the planner's bars show."""
    from transformers.utils import logging as hf_logging

    from attnshare import progress

    monkeypatch.setitem(progress._SHOWN, "bars", True)  # the switch is process-wide: leave it as found
    folder, text = tiny_folder
    base = ["apply", "--model", str(folder), "--method", "lisa", "--fraction", "0.5", "--calib-text", str(text),
            "--calib-tokens", "128", "--calib-seq-len", "32", "--heldout-tokens", "64"]
    try:
        capsys.readouterr()
        assert main([*base, "--no-progress", "--out", str(tmp_path / "quiet")]) == 0
        assert "%|" not in capsys.readouterr().err  # a tqdm bar's percentage and frame
        assert main([*base, "--out", str(tmp_path / "shown")]) == 0
        shown = capsys.readouterr().err
        assert "LiSA fit" in shown and "%|" in shown
    finally:
        hf_logging.enable_progress_bar()


def test_every_command_prints_its_help(capsys):
    """`attnshare <command> --help` works for every command: each flag's help is an argparse format string, so a
    stray percent sign in a config field's help would break it."""
    from attnshare.cli import COMMANDS

    for name in ["", *COMMANDS]:
        assert main([name, "--help"] if name else ["--help"]) == 0
        assert "usage: attnshare" in capsys.readouterr().out
