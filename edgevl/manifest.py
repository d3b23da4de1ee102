"""The export manifest: everything a runtime needs to run an exported directory (onnxruntime-genai's
genai_config.json idea), as one typed `Manifest`. The runtime reads this, never the original checkpoint. Torch-free.

Written once (`write_manifest`, last, after every other file) and read once (`read_manifest`): the dataclasses below
are the schema (docs/DESIGN.md lists it), and reading checks every value against them, type and range, naming the
file and dotted key of the first bad one. A manifest also protects its directory: every file is listed with its
size and checksum, and every path it names is relative, inside the directory and listed."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np

from .precisions import EXPORT_PRECISIONS
from .specs import Fields, ModelSpec, read_json, snippet, spec_to_dict

MANIFEST_NAME = "manifest.json"
FORMAT = "edgevl-export"
FORMAT_VERSION = 1
MAX_TILES = 64  # export_model's bound on --max-tiles
EXTERNAL_DATA_BYTES = 1 << 30  # a graph with more weight bytes keeps them in NAME.onnx.data (protobuf's 2 GB limit)
GRAPH_PRECISIONS = tuple(dict.fromkeys(p for r in EXPORT_PRECISIONS.values() for p in (r.vision, r.decoder)))
EMBED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_SHA256 = re.compile("[0-9a-f]{64}")


class ExportError(ValueError):
    """An exported directory that cannot be used; the message names the file and why."""


def _checked(**checks):
    """A field whose value is range-checked on read: choices, minimum, maximum (Fields.get's bounds)."""
    return field(metadata={"checks": checks})


@dataclass(frozen=True)
class Source:
    path: str  # the checkpoint it was exported from, for the record: the runtime never reads it
    format: str = _checked(choices=("original", "hf"))
    dtype: str


@dataclass(frozen=True)
class ImageTokens:
    img_start: int = _checked(minimum=0)
    img_end: int = _checked(minimum=0)
    img_context: int = _checked(minimum=0)


@dataclass(frozen=True)
class Precision:
    vision: str = _checked(choices=GRAPH_PRECISIONS)
    decoder: str = _checked(choices=GRAPH_PRECISIONS)


@dataclass(frozen=True)
class Limits:
    max_tiles: int = _checked(minimum=1, maximum=MAX_TILES)
    max_seq: int = _checked(minimum=1)  # and <= the spec's max_position_embeddings (Manifest.check)


@dataclass(frozen=True)
class Graphs:
    """Role -> file, relative to the export directory."""
    vision: str
    decoder: str
    embed_tokens: str
    decoder_fixed: str | None = None  # fp32 exports: the fixed-capacity decoder TensorRT's `--kv-cache fixed` reads
    # int8 / int4 exports: the decoder with edgevl's own Int8MatMul / Int4MatMul and GroupQueryAttention ops
    # (kernels/ort_ops.c), which x86 CPUs without VNNI, with AVX-512 VNNI and with AMX run (edgevl.cpu); the same
    # weights (decoder.onnx's data file) and the same results (int8 prefill bit for bit; decode steps and int4 to
    # float rounding).
    decoder_avx2: str | None = None
    # int8 / int4 exports: the vision graph with edgevl's MultiHeadAttention (bf16 on AMX tiles), which x86 CPUs with
    # AMX run (edgevl.cpu); the same weights (vision.onnx's data file); attention in bf16, the rest as vision.onnx.
    vision_amx: str | None = None


@dataclass(frozen=True)
class KVCache:
    """How a decoder graph takes and returns its cache. layout: concat (decoder.onnx as exported), shared
    (GroupQueryAttention graphs: past and present one buffer) or fixed (decoder_fixed.onnx); inputs, outputs and
    capacity say the contract in words for a reader of the JSON."""
    layout: str = _checked(choices=("concat", "shared", "fixed"))
    dtype: str = _checked(choices=("float32", "float16"))
    inputs: str
    outputs: str
    capacity: str | None = None
    decoder_fixed: KVCache | None = None


CONCAT_KV = KVCache("concat", "float32", inputs="past_key_values.{layer}.{key|value} [1, kv_heads, past, head_dim]",
                    outputs="present.{layer}.{key|value} [1, kv_heads, past + seq, head_dim]")
# The CPU decoders whose attention is ONNX Runtime's GroupQueryAttention (export/cpu_graph.py): past and present
# are one buffer, written in place, so a step copies nothing and attends over the valid rows only.
SHARED_KV = KVCache("shared", "float32",
                    inputs="past_key_values.{layer}.{key|value} [1, kv_heads, capacity, head_dim]",
                    outputs="present.{layer}.{key|value}: bound to the same buffer as past; the step's rows are "
                            "written at position_ids, whose last value + 1 is the valid length",
                    capacity="the runtime's max_seq (<= limits.max_seq)")
FIXED_KV = KVCache("fixed", "float32", inputs="past_key_values.{layer}.{key|value} [1, kv_heads, capacity, head_dim]",
                   outputs="present.{layer}.{key|value} [1, kv_heads, capacity, head_dim]: past with the step's rows "
                           "written at position_ids",
                   capacity="2..max_seq, fixed per TensorRT plan; cached rows at and after the step's first position "
                            "are masked, so they must hold finite values (zero-initialise)")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: input name -> (min, opt, max) shapes."""
    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]


@dataclass(frozen=True)
class GPU:
    name: str
    compute_capability: str  # "8.7"
    integrated: bool = False


@dataclass(frozen=True)
class TensorRTKVCache:
    layout: str = _checked(choices=("concat-ping-pong", "fixed-ping-pong"))
    dtype: str = _checked(choices=("float16",))
    note: str
    cuda_graph: bool = False  # the decode step can be a captured CUDA graph (static shapes)


@dataclass(frozen=True)
class Plans:
    vision: str
    decoder: str


@dataclass(frozen=True)
class TensorRTSection:
    """What `edgevl build` made; the runtime refuses plans whose version or GPU differ from this."""
    version: str
    gpu: GPU
    build_precision: str
    precision: dict[str, str]  # vision / decoder: TensorRT's graph precisions ("int8-weight-only", ...)
    strongly_typed: bool
    plans: Plans
    limits: Limits
    profiles: dict[str, list[Profile]]
    kv_cache: TensorRTKVCache
    io_dtypes: dict[str, str]
    build_seconds: dict[str, float]


@dataclass(frozen=True)
class FileEntry:
    bytes: int = _checked(minimum=0)
    sha256: str


@dataclass(frozen=True)
class Manifest:
    edgevl_version: str
    source: Source
    spec: ModelSpec
    template: str
    system_message: str | None  # the checkpoint's own, which replaces the template's default
    tokens: ImageTokens
    precision: Precision
    limits: Limits
    graphs: Graphs
    kv_cache: KVCache
    opset: int
    versions: dict[str, str]  # the libraries that made it
    quantization: dict[str, str] | None = None  # vision / decoder: the scheme in words
    drift_vs_fp32: dict | None = None  # edgevl.drift's figures and the CPU they were measured on; a record
    tensorrt: TensorRTSection | None = None
    files: dict[str, FileEntry] = field(default_factory=dict)  # every other file of the export
    format: str = field(default=FORMAT, metadata={"checks": {"choices": (FORMAT,)}})
    format_version: int = field(default=FORMAT_VERSION, metadata={"checks": {"choices": (FORMAT_VERSION,)}})

    def to_dict(self) -> dict:
        return _plain(self)

    def paths(self) -> dict[str, str]:
        """Dotted key -> every file the manifest names besides `files`."""
        named = {f"graphs.{f.name}": getattr(self.graphs, f.name) for f in dataclasses.fields(Graphs)}
        if self.tensorrt:
            named.update({f"tensorrt.plans.{f.name}": getattr(self.tensorrt.plans, f.name)
                          for f in dataclasses.fields(Plans)})
        return {key: name for key, name in named.items() if name is not None}


def _plain(value):
    """A manifest part as JSON values. An optional part that is None is left out; a field that must be given but
    may be null (system_message) is written as null."""
    if dataclasses.is_dataclass(value):
        if isinstance(value, ModelSpec):
            return _plain(spec_to_dict(value))
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None or (f.default is dataclasses.MISSING
                                                         and f.default_factory is dataclasses.MISSING)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def file_entry(path: Path) -> FileEntry:
    return FileEntry(path.stat().st_size, sha256(path))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def is_export_dir(path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def write_manifest(out_dir: Path, manifest: Manifest) -> Path:
    """Record every file of the export (sizes and checksums) and write manifest.json last, so a directory
    with a manifest is a complete one."""
    out_dir = Path(out_dir)
    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    manifest = dataclasses.replace(manifest, format=FORMAT, format_version=FORMAT_VERSION,
                                   files={str(p.relative_to(out_dir)): file_entry(p) for p in files})
    path = out_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False))
    return path


def read_manifest(export_dir, verify_checksums: bool = True) -> Manifest:
    """Read and check an exported directory: format, edgevl version, schema, every file present, sizes and
    checksums, and the embedding table's shape."""
    from . import __version__

    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(f"{path}: missing; not an edgevl export (run `edgevl export` first)")
    data = Fields(read_json(path, ExportError), path, ExportError).data
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: format {snippet(data.get('format'))} "
                          f"v{snippet(data.get('format_version'))}; this edgevl reads {FORMAT!r} "
                          f"v{FORMAT_VERSION}: re-export with this edgevl")
    if data.get("edgevl_version") != __version__:
        raise ExportError(f"{path}: written by edgevl {str(data.get('edgevl_version'))[:40]}, this is edgevl "
                          f"{__version__}: re-export the model with this version")
    manifest = manifest_from_dict(data, path)
    _check_paths(manifest, export_dir, path)
    for name, entry in manifest.files.items():
        file = export_dir / name
        if not file.is_file():
            raise ExportError(f"{file}: listed in {MANIFEST_NAME} but missing (incomplete copy?)")
        if file.stat().st_size != entry.bytes:
            raise ExportError(f"{file}: {file.stat().st_size} bytes, {MANIFEST_NAME} says {entry.bytes} "
                              "(truncated or modified)")
        if verify_checksums and sha256(file) != entry.sha256:
            raise ExportError(f"{file}: sha256 does not match {MANIFEST_NAME} (corrupted or modified)")
    _check_embed_table(export_dir / manifest.graphs.embed_tokens, manifest.spec)
    return manifest


def manifest_from_dict(data: dict, file: Path = Path(MANIFEST_NAME)) -> Manifest:
    """A Manifest from its JSON form, every value checked against the dataclasses (ExportError naming `file` and
    the key), then what ties the parts together."""
    m = Fields(data, file, ExportError)
    m.get("files", dict)  # has a default for writing; a file must carry it
    manifest = _typed(m, Manifest)
    if not manifest.files:
        m.fail("files", "is empty")
    for name, entry in manifest.files.items():
        if not _SHA256.fullmatch(entry.sha256):
            m.fail(f"files.{name}.sha256", f"= {snippet(entry.sha256)}: expected 64 lowercase hex digits")
    if manifest.kv_cache.layout == "fixed":
        m.fail("kv_cache.layout", "= \"fixed\": expected one of concat, shared (fixed is decoder_fixed's layout)")
    fixed = manifest.kv_cache.decoder_fixed
    if fixed is not None and fixed.layout != "fixed":
        m.fail("kv_cache.decoder_fixed.layout", f"= {snippet(fixed.layout)}: expected \"fixed\"")
    spec = manifest.spec
    if spec.tiling.image_size != spec.vision.image_size:
        m.fail("spec.tiling.image_size", f"= {spec.tiling.image_size}: differs from spec.vision.image_size = "
                                         f"{spec.vision.image_size} (tiles are cut at the vision encoder's size)")
    if manifest.limits.max_seq > spec.decoder.max_position_embeddings:
        m.fail("limits.max_seq", f"= {manifest.limits.max_seq}: expected >= 1 and <= "
                                 f"{spec.decoder.max_position_embeddings}")
    return manifest


def _check_paths(manifest: Manifest, export_dir: Path, file: Path) -> None:
    """Every path the manifest names: relative, inside export_dir and listed in `files` (so it is size- and
    checksum-checked)."""
    m = Fields({}, file, ExportError)
    for name in manifest.files:
        _check_path(m, "files", name, export_dir)
    for key, name in manifest.paths().items():
        _check_path(m, key, name, export_dir)
        if name not in manifest.files:
            m.fail(key, f"= {snippet(name)}: not listed in files (sizes and checksums must cover every file)")


def _check_path(m: Fields, key: str, name: str, export_dir: Path) -> None:
    relative, root = PurePath(name), Path(export_dir).resolve()
    inside = bool(relative.parts) and not relative.is_absolute() and ".." not in relative.parts and "\0" not in name
    try:  # resolved: a link inside the directory may point out of it
        inside = inside and (root / name).resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a link loop
        inside = False
    if not inside:
        m.fail(key, f"names {snippet(name)}: paths must be relative and stay inside the export directory "
                    "(no absolute paths, '..' or links out of it)")


# -- reading JSON into the dataclasses ----------------------------------------------------------------------

_SPEC_MODULES = ("edgevl.specs", "edgevl.preprocess")  # every number of a model spec is a positive size or scale


def _typed(section: Fields, cls):
    """section as an instance of the dataclass cls: no unknown keys, every field present unless it may be None
    (absent or null) or has a default, each value of its annotated type and within its field's checks."""
    hints = typing.get_type_hints(cls)
    for name in section.data.keys() - hints.keys():
        section.fail(name, f"is not a field of {cls.__name__}")
    values = {}
    for f in dataclasses.fields(cls):
        hint, value = hints[f.name], section.data.get(f.name)
        args = typing.get_args(hint)
        if type(None) in args:  # X | None
            if value is None:
                values[f.name] = None
                continue
            hint = next(t for t in args if t is not type(None))
        if value is None:  # a spec is written whole: its defaults are for code, not for files
            if cls.__module__ in _SPEC_MODULES or (f.default is dataclasses.MISSING
                                                   and f.default_factory is dataclasses.MISSING):
                section.fail(f.name, "is null" if f.name in section.data else "is missing")
            continue
        checks = dict(f.metadata.get("checks", {}))
        if cls.__module__ in _SPEC_MODULES and hint in (int, float):
            checks["positive"] = True
        values[f.name] = _value(section, f.name, hint, checks)
    try:
        return cls(**values)
    except ValueError as e:  # a dataclass's own check (TilingConfig's min_tiles <= max_tiles)
        raise section.error(f"{section.file}: {section.key.split('.')[0] or cls.__name__}: {e}") from None


def _value(section: Fields, key: str, hint, checks: dict):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _typed(section.get(key, dict), hint)
    if origin in (tuple, list):
        values = section.get(key, list)
        kinds = [args[0]] * len(values) if origin is list or args[-1] is Ellipsis else list(args)
        if len(kinds) != len(values):
            section.fail(key, f"has {len(values)} entries; expected {len(kinds)}")
        items = Fields({f"{key}[{i}]": v for i, v in enumerate(values)}, section.file, section.error, section.key)
        out = [_value(items, name, kind, checks) for name, kind in zip(items.data, kinds)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        inner = section.get(key, dict)
        return {name: _value(inner, name, args[1], checks) for name in inner.data}
    if hint is dict:  # a free-form record
        return section.get(key, dict).data
    return section.get(key, hint, **checks)


def _check_embed_table(path: Path, spec: ModelSpec) -> None:
    """embed_tokens.npy's header against the spec, before anything maps it: [vocab, hidden] float, data complete."""
    want = (spec.decoder.vocab_size, spec.decoder.hidden_size)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in readers:
                raise ValueError(f"format version {version}")
            shape, fortran_order, dtype = readers[version](f)
            data_start = f.tell()
    except ValueError as e:
        raise ExportError(f"{path}: not a .npy array ({e})") from None
    if shape != want or fortran_order or dtype not in EMBED_DTYPES:
        raise ExportError(f"{path}: {'Fortran-order ' if fortran_order else ''}{dtype} {list(shape)}; "
                          f"{MANIFEST_NAME}'s spec implies a float [vocab_size, hidden_size] = {list(want)}")
    if path.stat().st_size != data_start + dtype.itemsize * want[0] * want[1]:
        raise ExportError(f"{path}: {path.stat().st_size} bytes, but its header describes {dtype} {list(shape)} "
                          "after it (truncated or padded)")


def check_graph_shapes(export_dir, manifest: Manifest, graphs: dict[str, dict[str, list]]) -> None:
    """The exported graphs agree with the manifest's spec. graphs: "vision" / "decoder" -> tensor name -> shape as
    the runtime reports it (integers, or names / None for dynamic dimensions, which match any size)."""
    vision, decoder = manifest.spec.vision, manifest.spec.decoder
    size, hidden, layers = vision.image_size, decoder.hidden_size, decoder.num_layers
    files = {"vision": Path(export_dir) / manifest.graphs.vision, "decoder": Path(export_dir) / manifest.graphs.decoder}
    past_names = sorted(n for n in graphs["decoder"] if n.startswith("past_key_values."))
    if len(past_names) != 2 * layers:  # counted first: the spec's layer count is not trusted to size a loop
        _graph_mismatch(files["decoder"], f"{len(past_names)} past_key_values inputs; the spec has {layers} layers")
    past = [None, decoder.num_kv_heads, None, hidden // decoder.num_heads]
    expected = {"vision": {"pixel_values": [None, 3, size, size], "image_embeds": [None, None, hidden]},
                "decoder": {"inputs_embeds": [None, None, hidden],
                            **{f"past_key_values.{i}.{kv}": past for i in range(layers) for kv in ("key", "value")}}}
    for kind, tensors in expected.items():
        file, have = files[kind], graphs[kind]
        for name, want in tensors.items():
            got = have.get(name)
            if got is None:
                _graph_mismatch(file, f"{name} is not one of its inputs or outputs; the spec implies {_dims(want)}")
            if len(got) != len(want) or any(isinstance(g, int) and w is not None and g != w for g, w in zip(got, want)):
                _graph_mismatch(file, f"{name} has shape {_dims(got)}; the spec implies {_dims(want)}")


def _graph_mismatch(file: Path, problem: str):
    raise ExportError(f"{file}: {problem} ({MANIFEST_NAME}'s spec; re-export, or restore the manifest that came "
                      "with these graphs)")


def _dims(shape) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"
