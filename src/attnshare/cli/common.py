"""Shared CLI helpers: model flags, early checks of inputs and outputs, table printing, JSON output.

The ``check_*`` helpers run before the slow model load, so bad input is answered at once and no output is touched.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_model_args(p, default: str = "smollm2-135m") -> None:
    p.add_argument("--model", default=default, help=f"embedded name, local folder, .gguf file, HF id or attnshare artifact (default: {default})")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--num-layers", type=int, default=None, help="keep only the first N decoder layers (quick runs)")


def load_from_args(args):
    from ..api import load_model
    from ..errors import AttnshareError

    check_model_args(args)
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors comes with transformers
        SafetensorError = OSError
    try:
        return load_model(args.model, dtype=args.dtype, num_layers=args.num_layers)
    except SafetensorError as e:  # a truncated or garbled model.safetensors
        raise AttnshareError(
            f"The weights of model '{args.model}' are corrupt ({_first_line(e)}); save or download the model again."
        ) from e


def check_model_args(args) -> None:
    """``--model`` names something loadable and ``--num-layers`` fits it (cheap checks before the slow load)."""
    from ..api import is_artifact, read_artifact
    from ..errors import AttnshareError
    from ..models.gguf_file import check_gguf, find_gguf
    from ..models.loading import EMBEDDED, base_available, unknown_model

    name, num_layers = args.model, args.num_layers
    if not name or not name.strip():
        raise AttnshareError("--model is empty; give an embedded name (smollm2-135m), a model folder, a .gguf file "
                             "or an artifact.")
    if num_layers is not None and num_layers < 1:
        raise AttnshareError(f"--num-layers must be at least 1, got {num_layers}.")
    path = Path(name)
    if is_artifact(path):
        if num_layers is not None:
            raise AttnshareError(
                f"'{name}' is an attnshare artifact, which keeps its base model's layers; drop --num-layers."
            )
        identity = read_artifact(path)["base"]
        base = str(identity.get("base_model") or "")
        if _num_layers(base) is None and not base_available(identity):
            raise AttnshareError(
                f"The artifact '{name}' was made on base model '{base}', which is not here; put that model back "
                "(a local folder, a .gguf file or the local HF cache) to load the artifact."
            )
        return
    gguf = find_gguf(path)  # a .gguf file, or a folder holding one (several: refused here)
    if gguf is not None:
        total = check_gguf(gguf).num_layers  # magic, version, truncation, architecture, tokenizer: header only
        if num_layers is not None and total is not None and num_layers > total:
            raise AttnshareError(
                f"--num-layers {num_layers} is more than the {total} layers of model '{name}'; give 1..{total}."
            )
        return
    if path.is_file():
        raise AttnshareError(f"--model '{name}' is a file; give a model folder (with config.json), a .gguf file, an "
                             "embedded name or an attnshare artifact folder.")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AttnshareError(f"The folder '{name}' has no config.json, so it is neither a model nor an attnshare "
                                 "artifact; give a folder written by save_pretrained or `attnshare apply --out`, "
                                 "or a .gguf file.")
        try:
            json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AttnshareError(f"The config.json of model folder '{name}' is corrupt ({type(e).__name__}); save "
                                 "the model there again with save_pretrained.") from e
        if not any(path.glob("*.safetensors")):
            raise AttnshareError(f"The model folder '{name}' has no .safetensors weights (attnshare reads only "
                                 "safetensors); save the model there with save_pretrained.")
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise AttnshareError(f"The model folder '{name}' has no tokenizer files; save the tokenizer there too "
                                 "(tokenizer.save_pretrained).")
    total = _num_layers(name)
    if total is None and not path.exists() and name not in EMBEDDED:  # load_model's answer, before any output
        raise AttnshareError(unknown_model(name))
    if num_layers is not None and total is not None and num_layers > total:
        raise AttnshareError(
            f"--num-layers {num_layers} is more than the {total} layers of model '{name}'; give 1..{total}."
        )


def _num_layers(name: str) -> int | None:
    """The decoder layer count of a loadable model, or None if its config cannot be read (load_model says why).

    A GGUF file's count comes from its header (nothing is converted here); a GGUF file that is gone answers from
    the conversion once made from it."""
    from ..errors import AttnshareError
    from ..models.gguf_file import find_gguf, read_header

    try:
        gguf = find_gguf(name)
        if gguf is not None:
            return read_header(gguf).num_layers
    except AttnshareError:
        return None
    try:
        from transformers import AutoConfig

        from ..models.loading import resolve

        config = AutoConfig.from_pretrained(resolve(name), local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure here is reported by the real load that follows
        return None
    config = getattr(config, "text_config", None) or config
    return getattr(config, "num_hidden_layers", None)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def check_text(name: str | None, flag: str = "--text") -> None:
    """A named text or a non-empty local file; unknown names and empty files are refused before the model load."""
    if not name:
        return
    from ..data.corpus import TEXTS
    from ..errors import AttnshareError

    if name in TEXTS:
        return
    path = Path(name)
    if not path.is_file():
        raise AttnshareError(
            f"Unknown {flag} '{name}': use one of {', '.join(TEXTS)} or the path of a UTF-8 text file."
        )
    if not path.read_text(encoding="utf-8", errors="replace").strip():
        raise AttnshareError(f"The {flag} file '{name}' is empty; give a text with at least a few sentences.")


def check_out_folder(path: str | Path, flag: str = "--out", *, artifact: bool = False) -> Path:
    """``path`` can become a folder: it is not a file, nor inside one.

    With ``artifact``, an existing folder must be empty or an attnshare artifact, because saving replaces it whole.
    """
    from ..api import is_artifact
    from ..errors import AttnshareError

    path = Path(path)
    if path.is_file():
        hint = "a new one, or an artifact to replace" if artifact else "a new or existing one"
        raise AttnshareError(f"{flag} '{path}' is a file; pick a folder ({hint}).")
    _check_parents(path, flag)
    if artifact and path.is_dir() and any(path.iterdir()) and not is_artifact(path):
        raise AttnshareError(f"{flag} '{path}' is a folder of other files, not an attnshare artifact, and saving "
                             "would replace it; pick a new folder.")
    return path


def check_out_file(path: str | Path | None, flag: str, example: str = "out.json") -> None:
    """``path`` (if given) can become a file: it is not a folder, nor inside a file."""
    if not path:
        return
    from ..errors import AttnshareError

    path = Path(path)
    if path.is_dir():
        raise AttnshareError(f"{flag} '{path}' is a folder; give a file name (for example {path / example}).")
    _check_parents(path, flag)


def _check_parents(path: Path, flag: str) -> None:
    from ..errors import AttnshareError

    for parent in path.parents:
        if parent.is_file():
            raise AttnshareError(f"{flag} '{path}' lies inside '{parent}', which is a file; pick a path elsewhere.")
        if parent.is_dir():
            return


def add_method_args(p) -> None:
    """``--method``, ``--plan`` and every registered method's planning flags (generated from its config)."""
    from ..config import add_dataclass_args
    from ..methods import METHODS, get_method

    p.add_argument("--method", choices=sorted(METHODS), help="sharing method (not needed with --plan)")
    p.add_argument("--plan", help="plan JSON file from `attnshare plan` (one plan or a list applied in order)")
    for method in sorted(METHODS):
        add_dataclass_args(p, get_method(method).config_cls, tag=method)


def prepare_plans(args, *, required: bool = True):
    """Check ``--plan`` / ``--method`` and its flags before the slow model load; returns ``model -> plans``.

    With ``required=False`` and neither flag given, returns None.
    """
    from ..config import dataclass_from_args
    from ..errors import AttnshareError
    from ..methods import get_method
    from ..sharing.registry import load_plans

    if args.plan and args.method:
        raise AttnshareError("Give either --method NAME (with its options) or --plan FILE, not both.")
    if args.plan:
        plans = load_plans(args.plan)
        return lambda model: plans
    if not args.method:
        if not required:
            return None
        raise AttnshareError("Give --method NAME (with its options) or --plan FILE.")
    method = get_method(args.method)
    config = dataclass_from_args(method.config_cls, args)
    check_text(getattr(config, "calib_text", None), "--calib-text")
    return lambda model: [method.make_plan(model, config)]


def plans_from_args(args, model) -> list:
    """The plans named by ``--plan``, or made by ``--method``'s planner from its flags."""
    return prepare_plans(args)(model)


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """A GitHub-flavoured markdown table of ``rows``."""
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def write_json(path: str | Path | None, payload: dict) -> None:
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        print(f"wrote {path}")
