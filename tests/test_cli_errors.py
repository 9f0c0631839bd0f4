"""Bad input at every CLI entry point: ONE line `error: <sentence>`, exit status 2, no traceback, outputs untouched.

One table: each row is an argv (``{name}`` placeholders name the files the ``world`` fixture builds), the exit status,
and a regex the error sentence must match. Rows that need the embedded 30-layer model are marked ``real``. A row may
hide an optional dependency (``hide=``) to check the "install the extra" sentence.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from conftest import tiny_model
from test_foundation import _tiny_tokenizer

from attnshare.cli import main

OUTPUT_FLAGS = ("--out", "--out-dir", "--json", "--markdown", "--plot")
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """Every input the table names, built once: tiny models (good and broken), texts, plans and artifacts."""
    from attnshare.api import apply, save
    from attnshare.methods.sa.plan import SAPlan
    from attnshare.models import load_model

    root = tmp_path_factory.mktemp("world")
    paths: dict[str, Path] = {}

    def model_folder(name: str, model) -> Path:
        folder = root / name
        model.save_pretrained(folder)
        _tiny_tokenizer().save_pretrained(folder)
        paths[name] = folder
        return folder

    tiny = model_folder("tiny", tiny_model("llama"))
    model_folder("tiny2", tiny_model("llama", seed=1))  # same layout, other weights: another base model
    from transformers import AutoModelForCausalLM, GPT2Config

    model_folder("gpt2", AutoModelForCausalLM.from_config(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=32, n_positions=64, bos_token_id=0, eos_token_id=0)))
    for name, broken in [("noweights", "model.safetensors"), ("notokenizer", "tokenizer*"),
                         ("badweights", None), ("badconfig", None)]:
        folder = model_folder(name, tiny_model("llama"))
        if broken:
            for f in folder.glob(broken):
                f.unlink()
    weights = (root / "badweights" / "model.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    (root / "badconfig" / "config.json").write_text('{"model_type": "llama", ')

    def file(name: str, content: str | bytes) -> None:
        paths[name] = root / name
        (paths[name].write_bytes if isinstance(content, bytes) else paths[name].write_text)(content)

    file("text", TEXT)
    file("empty", "  \n")
    file("short", "abc")
    file("afile", "keep me")  # an existing file that outputs must not replace
    paths["nocfg"] = root / "nocfg"
    paths["nocfg"].mkdir()
    (paths["nocfg"] / "notes.txt").write_text("not a model")
    paths["userdir"] = paths["nocfg"]  # a folder of the user's files: never replaced by an artifact
    paths["missing"] = root / "missing"

    for name, plan in {
        "plan_big": {"method": "sa", "donors": {"25": 24}},  # made for a deeper model
        "plan_after": {"method": "sa", "donors": {"2": 3}},
        "plan_heads": {"method": "sa", "donors": {"2": 1}, "head_map": {"2": [0, 1]}},
        "plan_units": {"method": "directshare", "pairs": [[1, 9, 0, 0]]},
        "plan_nomethod": {"donors": {"2": 1}},
        "plan_badmethod": {"method": "zzz"},
        "plan_donorslist": {"method": "sa", "donors": [1, 2]},
        "plan_pairs": {"method": "directshare", "pairs": [[1, 0, 0]]},
        "plan_ints": [1, 2],
    }.items():
        file(name, json.dumps(plan))
    file("plan_corrupt", '{"method": "sa", "donors": {')
    file("plan_empty", "")
    file("plan_binary", b"\xff\xfe\x00garbage")

    model = load_model(str(tiny))[0]
    art = save(apply(model, SAPlan(donors={2: 1})), root / "art")
    paths["art"] = art
    meta = json.loads((art / "attnshare.json").read_text())

    def artifact(name: str, meta_text: str | None = None, tensors: bytes | None = None) -> None:
        folder = root / name
        folder.mkdir()
        (folder / "attnshare.json").write_text(meta_text if meta_text is not None else json.dumps(meta))
        if tensors is not None:
            (folder / "params.safetensors").write_bytes(tensors)
        paths[name] = folder

    good = (art / "attnshare.json").read_text()
    artifact("art_trunc", good[: len(good) // 2])
    artifact("art_format", json.dumps({**meta, "format": "something-else"}))
    artifact("art_gonebase", json.dumps({**meta, "base": {**meta["base"], "base_model": str(root / "gone")}}))
    artifact("art_otherbase", json.dumps({**meta, "base": {**meta["base"], "base_model": str(root / "tiny2")}}))
    (root / "art_garble").mkdir()
    (root / "art_garble" / "attnshare.json").write_bytes(b"\x00\xff\x89PNG garbage")
    paths["art_garble"] = root / "art_garble"
    with_tensors = json.dumps({**meta, "tensors": ["model.layers.2.self_attn.v_proj.weight"]})
    artifact("art_notensors", with_tensors)
    from safetensors.torch import save_file

    save_file({"model.layers.2.self_attn.v_proj.weight": model.model.layers[2].self_attn.v_proj.weight.detach()},
              root / "params.safetensors")
    artifact("art_badtensors", with_tensors, (root / "params.safetensors").read_bytes()[:60])
    return {k: str(v) for k, v in paths.items()}


def row(id: str, argv: str, code: int, message: str, *, hide: str | None = None, real: bool = False):
    return pytest.param(argv, code, message, hide, id=id, marks=[pytest.mark.real] if real else [])


T = "--model {tiny}"  # most rows use the tiny saved model
SA = f"apply {T} --method sa"
CASES = [
    # the command line itself (argparse): one line, then `see --help`
    row("no-command", "", 2, r"required: COMMAND; see `attnshare --help`\."),
    row("unknown-command", "frobnicate", 2, r"invalid choice: 'frobnicate'"),
    row("unknown-method", f"apply {T} --method nope --out {{out}}", 2, r"--method: invalid choice: 'nope' \(choose from"),
    row("missing-out", f"{SA} --receivers 2", 2, r"required: --out; see `attnshare apply --help`"),
    row("not-an-int", f"{SA} --receivers x --out {{out}}", 2, r"--receivers: invalid int value: 'x'"),
    # --model
    row("unknown-model", "apply --model no-such-model --method sa --receivers 2 --out {out}", 2,
        r"Unknown model 'no-such-model': use an embedded name \(smollm2-135m\)"),
    row("missing-model-path", "apply --model {missing} --method sa --receivers 2 --out {out}", 2, r"Unknown model '.*missing'"),
    row("empty-model", "generate --model '' --prompt abc", 2, r"--model is empty"),
    row("model-is-a-file", "apply --model {text} --method sa --receivers 2 --out {out}", 2, r"is a file; give a model folder"),
    row("folder-without-config", "eval --model {nocfg} --json {out}/e.json", 2, r"has no config\.json"),
    row("corrupt-config", "apply --model {badconfig} --method sa --receivers 2 --out {out}", 2, r"config\.json .* is corrupt"),
    row("no-weights", "apply --model {noweights} --method sa --receivers 2 --out {out}", 2, r"has no \.safetensors weights"),
    row("corrupt-weights", "apply --model {badweights} --method sa --receivers 2 --out {out}", 2, r"weights of model .* are corrupt"),
    row("no-tokenizer", "apply --model {notokenizer} --method sa --receivers 2 --out {out}", 2, r"has no tokenizer files"),
    row("unsupported-arch", "apply --model {gpt2} --method sa --receivers 1 --out {out}", 2,
        r"'gpt2' is not supported; supported types are: gemma2, gemma3_text, llama, mistral, olmo2, phi3, qwen2, "
        r"qwen3, and any other decoder whose layers hold Linear q/k/v \(or fused qkv\) and o projections"),
    row("num-layers-zero", f"{SA} --receivers 2 --num-layers 0 --out {{out}}", 2, r"--num-layers must be at least 1"),
    row("num-layers-too-many", f"{SA} --receivers 2 --num-layers 9 --out {{out}}", 2, r"more than the 4 layers .* give 1\.\.4"),
    row("num-layers-on-artifact", "eval --model {art} --num-layers 2 --json {out}/e.json", 2, r"artifact.* drop --num-layers"),
    # SA flags
    row("sa-receiver-out-of-range", f"{SA} --receivers 7 --out {{out}}", 2, r"layer 7 is out of range for a 4-layer model"),
    row("sa-receiver-0", f"{SA} --receivers 0 --out {{out}}", 2, r"Layer 0 has no earlier non-receiver layer"),
    row("sa-receiver-negative", f"{SA} --receivers -1 --out {{out}}", 2, r"-1 is not a layer index"),
    row("sa-duplicate-receivers", f"{SA} --receivers 2 2 --out {{out}}", 2, r"lists layer 2 twice"),
    row("sa-receivers-and-budget", f"{SA} --receivers 2 --budget 1 --out {{out}}", 2, r"--receivers .* or --budget.*not both"),
    row("sa-nothing-chosen", f"{SA} --out {{out}}", 2, r"SA needs --receivers"),
    row("sa-budget-negative", f"{SA} --budget -1 --out {{out}}", 2, r"--budget must be 0 or a positive"),
    row("sa-budget-fractional", f"plan {T} --method sa --budget 2.5 --out {{out}}/p.json", 2, r"number of receiver layers; got 2\.5"),
    row("sa-budget-too-large", f"plan {T} --method sa --budget 9 --out {{out}}/p.json", 2, r"budget of 9 .* out of range for a 4-layer"),
    row("sa-kv-saving-too-large", f"{SA} --kv-saving 0.7 --out {{out}}", 2, r"--kv-saving must lie in \[0, 0\.5\)"),
    row("sa-kv-saving-negative", f"{SA} --kv-saving -0.1 --out {{out}}", 2, r"--kv-saving must lie in"),
    row("calib-text-unknown", f"plan {T} --method sa --budget 1 --calib-text nope --out {{out}}/p.json", 2, r"Unknown --calib-text 'nope'"),
    row("calib-text-is-eval-text", f"plan {T} --method sa --budget 1 --calib-text hamlet --out {{out}}/p.json", 2, r"evaluation text"),
    # LiSA, DirectShare, PostShare flags
    row("lisa-fraction-above-1", f"apply {T} --method lisa --fraction 1.5 --out {{out}}", 2, r"--fraction must be between 0 and 1"),
    row("lisa-fraction-negative", f"plan {T} --method lisa --budget -0.1 --out {{out}}/p.json", 2, r"--fraction must be between 0 and 1"),
    row("lisa-layer-0", f"apply {T} --method lisa --layers 0 --out {{out}}", 2, r"Layer 0 has no previous layer"),
    row("lisa-layer-out-of-range", f"apply {T} --method lisa --layers 9 --out {{out}}", 2, r"layer 9, out of range for a 4-layer model"),
    row("lisa-duplicate-layers", f"apply {T} --method lisa --layers 2 2 --out {{out}}", 2, r"lists layer 2 twice"),
    row("lisa-odd-rank", f"apply {T} --method lisa --layers 2 --rank 3 --out {{out}}", 2, r"needs an even rank"),
    row("lisa-fit-probs", f"apply {T} --method lisa --layers 2 --source probs --out {{out}}", 2, r"add --init permutation to use --source probs"),
    row("ds-ratio-above-1", f"apply {T} --method directshare --ratio 1.5 --out {{out}}", 2, r"--ratio must be in \[0, 1\)"),
    row("ds-ratio-negative", f"plan {T} --method directshare --budget -0.2 --out {{out}}/p.json", 2, r"--ratio must be in \[0, 1\)"),
    row("ds-unknown-match", f"apply {T} --method directshare --match zz --out {{out}}", 2, r"Unknown match function 'zz'"),
    row("postshare-negative-reg", f"apply {T} --method postshare --reg-weight -1 --out {{out}}", 2, r"--reg-weight must be zero"),
    row("no-method-nor-plan", f"apply {T} --out {{out}}", 2, r"Give --method NAME .* or --plan FILE"),
    row("method-and-plan", f"{SA} --receivers 2 --plan {{plan_after}} --out {{out}}", 2, r"either --method .* not both"),
    # plan files
    row("plan-missing", f"apply {T} --plan {{missing}}.json --out {{out}}", 2, r"does not exist; write one with `attnshare plan`"),
    row("plan-corrupt-json", f"apply {T} --plan {{plan_corrupt}} --out {{out}}", 2, r"is not valid JSON"),
    row("plan-empty-file", f"plan {T} --plan {{plan_empty}}", 2, r"is not valid JSON"),
    row("plan-binary-file", f"plan {T} --plan {{plan_binary}}", 2, r"is not valid JSON"),
    row("plan-not-an-object", f"plan {T} --plan {{plan_ints}}", 2, r"must be a JSON object with a 'method' field"),
    row("plan-no-method", f"plan {T} --plan {{plan_nomethod}}", 2, r"must be a JSON object with a 'method' field"),
    row("plan-unknown-method", f"plan {T} --plan {{plan_badmethod}}", 2, r"Unknown method 'zzz'"),
    row("plan-malformed-donors", f"plan {T} --plan {{plan_donorslist}}", 2, r"sa plan is malformed"),
    row("plan-malformed-pairs", f"plan {T} --plan {{plan_pairs}}", 2, r"directshare plan is malformed"),
    row("plan-for-another-model", f"apply {T} --plan {{plan_big}} --out {{out}}", 2, r"receiver layer 25, out of range for a 4-layer"),
    row("plan-donor-after-receiver", f"apply {T} --plan {{plan_after}} --out {{out}}", 2, r"a donor must come before its receiver"),
    row("plan-head-map-size", f"plan {T} --plan {{plan_heads}}", 2, r"head map of layer 2 must list 4 donor heads"),
    row("plan-unit-out-of-range", f"plan {T} --plan {{plan_units}}", 2, r"unit 9, out of range for a model with 2 units per layer"),
    row("plan-needs-out", f"plan {T} --method sa --budget 1", 2, r"Give --out FILE"),
    row("plan-out-is-a-folder", f"plan {T} --method sa --budget 1 --out {{nocfg}}", 2, r"is a folder; give a file name"),
    row("plan-out-inside-a-file", f"plan {T} --method sa --budget 1 --out {{afile}}/p.json", 2, r"inside .*afile', which is a file"),
    # outputs
    row("out-is-a-file", f"{SA} --receivers 2 --out {{afile}}", 2, r"is a file; pick a folder"),
    row("out-inside-a-file", f"{SA} --receivers 2 --out {{afile}}/art", 2, r"inside .*afile', which is a file"),
    row("out-is-a-user-folder", f"{SA} --receivers 2 --out {{userdir}}", 2, r"not an attnshare artifact, and saving would replace it"),
    row("train-out-is-a-file", f"train {T} --method sa --receivers 2 --out {{afile}}", 2, r"--out .* is a file"),
    row("train-out-dir-is-a-file", f"train {T} --method sa --receivers 2 --out {{out}}/a --out-dir {{afile}}", 2, r"--out-dir .* is a file"),
    row("eval-json-is-a-folder", f"eval {T} --window 64 --json {{nocfg}}", 2, r"--json .* is a folder"),
    row("bench-json-is-a-folder", f"bench {T} --scenario tiny --method sa --receivers 2 --json {{nocfg}}", 2, r"--json .* is a folder"),
    row("bench-markdown-in-a-file", f"bench {T} --scenario tiny --method sa --receivers 2 --markdown {{afile}}/b.md", 2, r"which is a file"),
    row("sweep-plot-is-a-folder", f"sweep {T} --method sa --vary budget --values 1 --plot {{nocfg}}", 2, r"--plot .* is a folder"),
    row("analyze-out-is-a-file", f"analyze {T} --out {{afile}}", 2, r"--out .* is a file"),
    row("demo-out-is-a-file", "demo --out {afile}", 2, r"--out .* is a file"),
    row("demo-unknown-model", "demo --model no-such-model --out {out}/report", 2, r"Unknown model 'no-such-model'"),
    # texts
    row("eval-unknown-text", f"eval {T} --text nope --json {{out}}/e.json", 2, r"Unknown --text 'nope': use one of britannica"),
    row("eval-empty-text", f"eval {T} --text {{empty}} --json {{out}}/e.json", 2, r"--text file .* is empty"),
    row("eval-too-short-text", f"eval {T} --text {{short}} --window 64 --proxy-items 0 --json {{out}}/e.json", 2, r"fewer than one block of 64"),
    row("eval-window-over-context", f"eval {T} --text {{text}} --window 1024 --json {{out}}/e.json", 2, r"longer than the model's context of 256"),
    row("eval-negative-proxy-items", f"eval {T} --text {{text}} --proxy-items -1 --json {{out}}/e.json", 2, r"--proxy-items must be 0 or more"),
    row("eval-unknown-proxy", f"eval {T} --text {{text}} --proxies nope --json {{out}}/e.json", 2, r"Unknown proxy task 'nope'"),
    row("train-unknown-text", f"train {T} --method sa --receivers 2 --text nope --out {{out}}/a", 2, r"Unknown --text 'nope'"),
    row("train-empty-text", f"train {T} --method sa --receivers 2 --text {{empty}} --out {{out}}/a", 2, r"is empty"),
    row("train-bad-lr", f"train {T} --method sa --receivers 2 --lr -1 --out {{out}}/a", 2, r"lr must be a positive"),
    row("analyze-unknown-text", f"analyze {T} --text nope --out {{out}}/a", 2, r"Unknown --text 'nope'"),
    row("analyze-eval-text", f"analyze {T} --text hamlet --out {{out}}/a", 2, r"'hamlet' is an evaluation text"),
    row("sweep-unknown-text", f"sweep {T} --method sa --vary budget --values 1 --text nope", 2, r"Unknown --text 'nope'"),
    # artifacts given as --model / --artifact
    row("artifact-truncated-json", "eval --model {art_trunc} --json {out}/e.json", 2, r"attnshare\.json' is corrupt \(JSONDecodeError\)"),
    row("artifact-garbled-json", "generate --model {art_garble} --prompt abc", 2, r"is corrupt \(UnicodeDecodeError\)"),
    row("artifact-other-format", "eval --model {art_format} --json {out}/e.json", 2, r"not in attnshare's format"),
    row("artifact-tensors-missing", "eval --model {art_notensors} --json {out}/e.json", 2, r"tensor file .* is missing or corrupt"),
    row("artifact-tensors-truncated", "eval --model {art_badtensors} --json {out}/e.json", 2, r"tensor file .* is missing or corrupt"),
    row("artifact-base-gone", "eval --model {art_gonebase} --json {out}/e.json", 2, r"made on base model .*gone', which is not here"),
    row("artifact-for-another-base", "eval --model {art_otherbase} --window 64 --json {out}/e.json", 2, r"was made for base model"),
    row("bench-artifact-for-another-base", "bench --model {tiny2} --scenario tiny --artifact {art}", 2,
        r"made for base model .*tiny', not for --model .*tiny2"),
    row("bench-not-an-artifact", f"bench {T} --scenario tiny --artifact {{nocfg}}", 2, r"is not an attnshare artifact"),
    # generate, bench, sweep specifics
    row("generate-empty-prompt", f"generate {T} --prompt ' '", 2, r"The prompt is empty"),
    row("generate-zero-tokens", f"generate {T} --prompt abc --max-new-tokens 0", 2, r"--max-new-tokens must be at least 1"),
    row("generate-over-context", f"generate {T} --prompt abc --max-new-tokens 999", 2, r"exceed the model's context of 256"),
    row("bench-unknown-scenario", f"bench {T} --scenario nope --method sa --receivers 2", 2, r"Unknown scenario 'nope'; choose one of: tiny"),
    row("bench-no-variant", f"bench {T} --scenario tiny", 2, r"Give a variant to compare with the base"),
    row("bench-negative-context", f"bench {T} --scenario tiny --context -5 --method sa --receivers 2", 2, r"at least 1 \(got 1, -5"),
    row("bench-plan-for-another-model", f"bench {T} --scenario tiny --plan {{plan_big}}", 2, r"out of range for a 4-layer"),
    row("sweep-no-method", f"sweep {T} --vary budget --values 1", 2, r"Give --method NAME to sweep"),
    row("sweep-with-plan", f"sweep {T} --method sa --vary budget --values 1 --plan {{plan_big}}", 2, r"drop --plan"),
    row("sweep-unknown-setting", f"sweep {T} --method sa --vary nope --values 1", 2, r"sa has no setting 'nope'; vary one of: budget"),
    row("sweep-non-numeric-setting", f"sweep {T} --method sa --vary align_heads --values 1", 2, r"no numeric setting 'align_heads'"),
    row("sweep-non-numeric-values", f"sweep {T} --method sa --vary budget --values two", 2, r"--values for budget must be int"),
    row("sweep-budget-too-large", f"sweep {T} --method sa --vary budget --values 1 9", 2, r"budget of 9 .* out of range"),
    # missing optional dependencies: say which extra to install
    row("no-matplotlib-sweep", f"sweep {T} --method sa --vary budget --values 1 --plot {{out}}/p.png", 2,
        r"pip install 'attnshare\[plot\]'", hide="matplotlib"),
    row("no-matplotlib-analyze", f"analyze {T} --out {{out}}/a", 2, r"pip install 'attnshare\[plot\]'", hide="matplotlib"),
    row("no-lm-eval", f"eval {T} --lm-eval-tasks foo --json {{out}}/e.json", 2, r"pip install 'attnshare\[eval\]'", hide="lm_eval"),
    # the embedded 30-layer model
    row("real-receiver-77", "apply --model smollm2-135m --method sa --receivers 77 --out {out}", 2,
        r"^error: Receiver layer 77 is out of range for a 30-layer model; pick receivers in 1\.\.29\.$", real=True),
    row("real-budget-30", "plan --model smollm2-135m --method sa --budget 30 --out {out}/p.json", 2,
        r"budget of 30 receivers is out of range for a 30-layer model", real=True),
    row("real-num-layers-31", "eval --model smollm2-135m --num-layers 31 --json {out}/e.json", 2,
        r"--num-layers 31 is more than the 30 layers", real=True),
    row("real-artifact-for-another-base", "bench --model smollm2-135m --scenario tiny --artifact {art}", 2,
        r"made for base model .*tiny', not for --model smollm2-135m", real=True),
]


def _snapshot(path: Path):
    """What a path holds now: None, a file's bytes, or a folder's relative paths and file contents."""
    if path.is_file():
        return path.read_bytes()
    if path.is_dir():
        return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None) for p in path.rglob("*"))
    return None


@pytest.mark.parametrize("argv, code, message, hide", CASES)
def test_bad_input_is_one_sentence(world, tmp_path, capsys, monkeypatch, argv, code, message, hide):
    out = tmp_path / "out"  # never created by a failing command
    args = shlex.split(argv.format(out=out, **world))
    outputs = [Path(args[i + 1]) for i, a in enumerate(args[:-1]) if a in OUTPUT_FLAGS]
    before = {p: _snapshot(p) for p in outputs}
    if hide:  # the optional dependency looks uninstalled
        for name in [m for m in sys.modules if m == hide or m.startswith(hide + ".")] + [hide]:
            monkeypatch.setitem(sys.modules, name, None)
    capsys.readouterr()

    assert main(args) == code

    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"want one final error line, got: {lines}"
    assert errors[0].endswith("."), errors[0]
    assert re.search(message, errors[0]), errors[0]
    for path, state in before.items():
        assert _snapshot(path) == state, f"{path} was changed"
    assert list(tmp_path.iterdir()) == [], "a failing command left files behind"
