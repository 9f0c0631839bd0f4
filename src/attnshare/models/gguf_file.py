"""GGUF files as base models: cheap header checks, and one conversion into a cached plain HF checkpoint.

A GGUF (llama.cpp's format) holds the weights, often quantised, and the config and tokenizer as metadata.
transformers reads it with ``from_pretrained(folder, gguf_file=...)``, de-quantising every tensor, but a model
loaded that way refuses ``save_pretrained`` and every load parses the whole file again. So each file is converted
once into float32 safetensors + config + tokenizer under ``cache_dir()/gguf/<sha256[:16]>/transformers-<version>``
(the content hash, so a renamed or copied file reuses it; the transformers version, because its GGUF readers change
between releases), written atomically; later loads read that folder in seconds. The hash of a file is remembered
by path, size and modification time (``hashes.json`` there), so an unchanged multi-GB file is not read again.

The header checks (:func:`check_gguf`) read only the metadata and tensor table, never the tensor data, so bad files
are answered with one sentence before any slow work.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import mmap
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..arch import arch_of
from ..errors import AttnshareError
from ..hf_compat import versions
from ..paths import cache_dir, write_file, write_folder

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # v1 counted with 32-bit integers; llama.cpp has not written it since 2023
GGUF_SUFFIX = ".gguf"
DEFAULT_ALIGNMENT = 32

# GGUF architecture name -> the HF model_type it converts to: decoder architectures transformers' GGUF loader
# converts (5.17 to 5.25). Those whose model_type attnshare records (arch.arch_of on its config) are accepted, see
# supported_architectures(). Mistral files usually say "llama"; transformers tells them apart by general.name.
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}

HASHES_JSON = "hashes.json"  # path|size|mtime -> sha256 of the GGUF files seen, beside the conversions
SOURCE_JSON = "attnshare-gguf.json"  # written last into each converted folder: what it was converted from
CONVERSION = 2  # bump when the conversion below changes what it writes (old cache folders are then ignored)
_HASH_CHUNK = 8 << 20
_PROGRESS_BYTES = 32 << 20  # files smaller than this convert in a few seconds: no progress bar

# metadata value types (gguf spec): fixed-size ones by struct code, 8 = string, 9 = array
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    """The file ended inside its header."""


@dataclass(frozen=True)
class GgufHeader:
    """What a GGUF's header says: metadata (strings and numbers; arrays of strings as their length) and the bytes
    its tensor table needs."""

    path: Path
    version: int
    metadata: dict = field(repr=False)
    tensors: dict[str, tuple[tuple[int, ...], int]] = field(repr=False)  # name -> (shape, ggml type)
    data_end: int  # the file must hold at least this many bytes

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def num_layers(self) -> int | None:
        count = self.metadata.get(f"{self.architecture}.block_count")
        return count if isinstance(count, int) else None


# ---- finding and checking ----------------------------------------------------------------------------------------


def find_gguf(name_or_path: str | Path) -> Path | None:
    """The GGUF file ``name_or_path`` names: a file ending in .gguf or starting with the GGUF magic, or the only .gguf
    file of a folder without config.json. None for anything else; a folder of several .gguf files is refused."""
    path = Path(name_or_path)
    try:
        if path.is_file():
            return path if path.suffix.lower() == GGUF_SUFFIX or _magic(path) == GGUF_MAGIC else None
        if not path.is_dir() or (path / "config.json").exists():
            return None
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    except OSError:
        return None
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise AttnshareError(
            f"The folder '{path}' holds {len(found)} .gguf files ({names}); give the path of the one to load."
        )
    return found[0] if found else None


def check_gguf(path: str | Path) -> GgufHeader:
    """The header of a GGUF file attnshare can convert, or one sentence saying why not (reads no tensor data)."""
    header = read_header(path)
    if header.architecture not in supported_architectures():
        raise AttnshareError(
            f"The GGUF file '{path}' holds a '{header.architecture or 'unnamed'}' model, which attnshare cannot "
            f"convert and share; supported GGUF architectures: {', '.join(supported_architectures())}."
        )
    if not header.metadata.get("tokenizer.ggml.tokens") or "tokenizer.ggml.model" not in header.metadata:
        raise AttnshareError(
            f"The GGUF file '{path}' has no tokenizer in its metadata; convert the model again with its tokenizer "
            "(llama.cpp's convert_hf_to_gguf.py writes one)."
        )
    if not header.tensors:
        raise AttnshareError(f"The GGUF file '{path}' holds no tensors; convert the model again.")
    return header


@functools.cache
def supported_architectures() -> tuple[str, ...]:
    """The GGUF architectures transformers converts into a model type attnshare shares, sorted."""
    from transformers import AutoConfig

    supported = []
    for gguf_arch, model_type in GGUF_ARCHITECTURES.items():
        try:
            arch_of(AutoConfig.for_model(model_type))
        except (AttnshareError, ValueError, KeyError):
            continue
        supported.append(gguf_arch)
    return tuple(sorted(supported))


def read_header(path: str | Path) -> GgufHeader:
    """Parse a GGUF's metadata and tensor table; wrong magic, an unknown version or type, and a file shorter than its
    header says each get one sentence."""
    path = Path(path)
    size = path.stat().st_size
    if _magic(path) != GGUF_MAGIC:
        raise AttnshareError(
            f"'{path}' is not a GGUF file (it does not start with the GGUF magic bytes); give a .gguf model file, "
            "a model folder, an embedded name or an attnshare artifact."
        )
    truncated = (f"The GGUF file '{path}' is truncated (it ends inside its header, after {size} bytes); copy or "
                 "download it again.")
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            header = _parse(path, buf, size)
    except _Truncated:
        raise AttnshareError(truncated) from None
    if size < header.data_end:
        raise AttnshareError(
            f"The GGUF file '{path}' is truncated ({size} bytes, but its tensors need {header.data_end}); copy or "
            "download it again."
        )
    return header


def _magic(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(4)


def _parse(path: Path, buf, size: int) -> GgufHeader:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    reader = _Reader(buf, size)
    reader.pos = 4
    version = reader.scalar("I")
    if version not in GGUF_VERSIONS and struct.unpack(">I", struct.pack("<I", version))[0] in GGUF_VERSIONS:
        reader.endian, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]  # a big-endian file
    if version not in GGUF_VERSIONS:
        raise AttnshareError(
            f"The GGUF file '{path}' is format version {version}; attnshare reads GGUF versions "
            f"{' and '.join(map(str, GGUF_VERSIONS))} (convert the model again with a current llama.cpp)."
        )
    tensor_count, kv_count = reader.scalar("Q"), reader.scalar("Q")
    metadata = {}
    for _ in range(kv_count):
        key = reader.string()
        metadata[key] = reader.value(reader.scalar("I"))
    tensors, data_end = {}, 0
    for _ in range(tensor_count):
        name = reader.string()
        dims = tuple(reader.scalar("Q") for _ in range(reader.scalar("I")))
        ggml_type, offset = reader.scalar("I"), reader.scalar("Q")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise AttnshareError(
                f"The GGUF file '{path}' stores tensor '{name}' as ggml type {ggml_type}, which the installed gguf "
                "package cannot read; upgrade it (pip install -U gguf) or convert the model again."
            ) from None
        elements = 1
        for d in dims:
            elements *= d
        tensors[name] = (tuple(reversed(dims)), ggml_type)  # GGUF lists dimensions innermost first
        data_end = max(data_end, offset + elements // block * type_size)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    alignment = alignment if isinstance(alignment, int) and alignment > 0 else DEFAULT_ALIGNMENT
    data_start = -(-reader.pos // alignment) * alignment
    return GgufHeader(path=path, version=version, metadata=metadata, tensors=tensors, data_end=data_start + data_end)


class _Reader:
    """Little-endian (or big-endian) reads off a memory map; running past the end raises :class:`_Truncated`."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos, self.endian = buf, size, 0, "<"

    def _take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _Truncated
        self.pos = start + n
        return start

    def scalar(self, code: str):
        fmt = self.endian + code
        return struct.unpack_from(fmt, self.buf, self._take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("Q")
        start = self._take(n)
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise _Truncated  # not a value type: the header is garbled
        item, count = self.scalar("I"), self.scalar("Q")
        if item in _SCALAR:  # small numeric arrays (per-layer head counts) are kept, long ones counted
            width = struct.calcsize(self.endian + _SCALAR[item])
            start = self._take(count * width)
            if count > 4096:
                return count
            return list(struct.unpack_from(f"{self.endian}{count}{_SCALAR[item]}", self.buf, start))
        if item == _STRING:  # tokens and merges: only their number is kept
            for _ in range(count):
                self._take(self.scalar("Q"))
            return count
        for _ in range(count):  # arrays of arrays
            self.value(item)
        return count


# ---- the content hash and the cache ------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's content, read in chunks. Remembered in the cache by path, size and modification time,
    so an unchanged multi-GB file is hashed once, not on every load."""
    path = Path(path).resolve()
    key = _stat_key(path)
    known = _known_hashes().get(key)
    if isinstance(known, str):
        return known
    digest = _sha256(path)
    _remember_hash(key, digest)
    return digest


def known_sha256(path: str | Path) -> str | None:
    """The remembered sha256 of an unchanged file, or None (nothing is read)."""
    path = Path(path).resolve()
    known = _known_hashes().get(_stat_key(path))
    return known if isinstance(known, str) else None


def _stat_key(path: Path) -> str:
    stat = path.stat()
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with _progress(path.stat().st_size, f"Hashing {path.name}", unit="B", big=8 * _PROGRESS_BYTES) as bar, \
            path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _hashes_file() -> Path:
    return gguf_cache_root() / HASHES_JSON


def _known_hashes() -> dict:
    try:
        known = json.loads(_hashes_file().read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _remember_hash(key: str, digest: str) -> None:
    """Add one entry (the newest 256 are kept), replacing the file in one rename; a lost race only costs a rehash."""
    known = {k: v for k, v in _known_hashes().items() if k != key}
    known = dict(list(known.items())[-255:]) | {key: digest}
    try:
        write_file(_hashes_file(), lambda tmp: Path(tmp).write_text(json.dumps(known, indent=1) + "\n"))
    except OSError as e:  # a read-only cache still converts, it just hashes again next time
        log.debug("Cannot remember the hash of %s: %s", key, e)


def gguf_cache_root() -> Path:
    return cache_dir() / "gguf"


def _version_folder() -> str:
    return f"transformers-{versions()['transformers']}-c{CONVERSION}"


def _complete(folder: Path) -> bool:
    return (folder / SOURCE_JSON).is_file() and (folder / "config.json").is_file()


def cached_conversion(sha256: str, *, any_version: bool = False) -> Path | None:
    """The finished conversion of the file with this content hash made by this transformers version; with
    ``any_version``, else the newest made by another (a base whose GGUF file is gone still loads; an artifact's
    fingerprint check guards against a conversion that differs)."""
    root = gguf_cache_root() / sha256[:16]
    if _complete(root / _version_folder()):
        return root / _version_folder()
    if not any_version:
        return None
    others = sorted((p for p in root.glob("transformers-*") if _complete(p)), key=lambda p: p.stat().st_mtime)
    return others[-1] if others else None


def cached_conversion_of(source: str | Path) -> Path | None:
    """A finished conversion that was made from the file at ``source`` (looked up when that file is gone)."""
    source = str(Path(source).expanduser().resolve())
    found = []
    for marker in gguf_cache_root().glob(f"*/transformers-*/{SOURCE_JSON}"):
        try:
            if json.loads(marker.read_text()).get("source") == source:
                found.append(marker.parent)
        except (OSError, ValueError):
            continue
    if not found:
        return None
    current = [p for p in found if p.name == _version_folder()]
    return (current or sorted(found, key=lambda p: p.stat().st_mtime))[-1]


def gguf_checkpoint(path: str | Path) -> tuple[Path, str]:
    """``(folder, sha256)``: the cached plain-HF conversion of a GGUF file, converting it on first use.

    An unchanged file already converted costs a stat and two small reads; any other is checked (header only) before
    it is hashed, so a bad file is refused without reading it whole."""
    path = Path(path)
    known = known_sha256(path)
    if known and _complete(target := gguf_cache_root() / known[:16] / _version_folder()):
        return target, known
    header = check_gguf(path)
    sha256 = known or file_sha256(path)
    target = gguf_cache_root() / sha256[:16] / _version_folder()
    if _complete(target):
        return target, sha256
    started = time.perf_counter()
    log.info("Converting %s into %s (once; later loads read the cache)", path, target)
    convert_gguf(path, target, header, sha256)
    log.info("Converted %s in %.1f s", path.name, time.perf_counter() - started)
    return target, sha256


# ---- the conversion ----------------------------------------------------------------------------------------------


def convert_gguf(path: Path, target: Path, header: GgufHeader, sha256: str) -> Path:
    """De-quantise ``path`` into float32 safetensors + config + tokenizer in ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = path.resolve()
    folder, name = path.parent, path.name
    # transformers does not read the head width off every architecture (Qwen3 files state it as key_length but
    # get the config class's default); llama.cpp's key_length is the true one
    overrides = {}
    key_length = header.metadata.get(f"{header.architecture}.attention.key_length")
    if isinstance(key_length, int) and key_length > 0:
        overrides["head_dim"] = key_length
    with _progress(4, f"Converting {name} (once)", unit="step", big=_PROGRESS_BYTES,
                   size=path.stat().st_size) as bar:
        try:
            bar.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
            _set_pad_token(tokenizer, header.metadata.get("tokenizer.ggml.padding_token_id"))
            bar.update()
            bar.set_postfix_str("weights")
            loaded, info = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32, local_files_only=True, output_loading_info=True,
                quantization_config=GgufConfig(dequantize=True), **overrides,
            )
            bar.update()
        except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, NotImplementedError) as e:
            log.debug("GGUF conversion of %s failed", path, exc_info=True)
            raise AttnshareError(
                f"transformers could not convert the GGUF file '{path}' ({_first_line(e)}); convert the model again "
                "with a current llama.cpp, or give a Hugging Face model folder."
            ) from e
        missing = sorted(info.get("missing_keys") or ())
        if missing:  # transformers would leave them randomly initialised
            raise AttnshareError(
                f"The GGUF file '{path}' lacks the tensors of {len(missing)} weights of its model (such as "
                f"{missing[0]}); convert the model again with a current llama.cpp."
            )
        state = loaded.state_dict()
        packed = [k for k, v in state.items() if not v.is_floating_point()]
        if packed:
            raise AttnshareError(
                f"transformers left tensor '{packed[0]}' of the GGUF file '{path}' quantised; attnshare needs float "
                "weights (give a Hugging Face model folder instead)."
            )
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        # a model loaded from a GGUF refuses save_pretrained: save its state dict through a plain skeleton of the same
        # class, built on the meta device so no second copy of the weights is allocated
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.generation_config = loaded.generation_config
        source = {"source": str(path), "sha256": sha256, "architecture": header.architecture,
                  "transformers": versions()["transformers"], "conversion": CONVERSION}

        def write(tmp: Path) -> None:
            bar.set_postfix_str("saving")
            plain.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            (tmp / SOURCE_JSON).write_text(json.dumps(source, indent=2) + "\n")  # last: marks the folder complete
            bar.update()

        write_folder(target, write)
        bar.update()
    return target


def _set_pad_token(tokenizer, pad_id) -> None:
    """Give ``tokenizer`` the file's own padding token: transformers 5.17 ignores ``tokenizer.ggml.padding_token_id``
    (leaving none, so ``padding=True`` fails, or a converter's default)."""
    if isinstance(pad_id, int) and 0 <= pad_id < len(tokenizer):
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def _progress(total: int, desc: str, *, unit: str, big: int, size: int | None = None):
    """A tqdm bar, shown only for work on a file of at least ``big`` bytes (``size``, else ``total``)."""
    from ..progress import progress_bar

    shown = (size if size is not None else total) >= big
    return progress_bar(total=total, desc=desc, unit=unit, unit_scale=unit == "B", show=shown, leave=False)
