"""The export manifest: everything a runtime needs to run an exported directory (onnxruntime-genai's
genai_config.json idea). The runtime reads this, never the original checkpoint. Torch-free.

A manifest protects its directory: every file is listed with its size and checksum, every path it names is
relative, inside the directory and listed, and what the runtimes read is checked for type and range on load."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from pathlib import Path, PurePath

import numpy as np

from .specs import Fields, ModelSpec, read_json, snippet, spec_from_dict

MANIFEST_NAME = "manifest.json"
FORMAT = "edgevl-export"
FORMAT_VERSION = 1
MAX_TILES = 64  # export_model's bound on --max-tiles
REQUIRED_GRAPHS = ("vision", "decoder", "embed_tokens")
KV_LAYOUTS = ("concat", "shared")  # what ONNX Runtime runs; TensorRT's layouts live in the `tensorrt` section
KV_DTYPES = ("float32", "float16")
GRAPH_PRECISIONS = ("fp32", "fp16", "int8", "int4")
EMBED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_SHA256 = re.compile("[0-9a-f]{64}")


class ExportError(ValueError):
    """An exported directory that cannot be used; the message names the file and why."""


def file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def is_export_dir(path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    """Record every file of the export (sizes and checksums) and write manifest.json last, so a directory
    with a manifest is a complete one."""
    out_dir = Path(out_dir)
    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
                "files": {str(p.relative_to(out_dir)): file_entry(p) for p in files}}
    path = out_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    return path


def read_manifest(export_dir, verify_checksums: bool = True) -> dict:
    """Read and check an exported directory: format, edgevl version, schema, every file present, sizes and
    checksums, and the embedding table's shape."""
    from . import __version__

    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(f"{path}: missing; not an edgevl export (run `edgevl export` first)")
    manifest = Fields(read_json(path, ExportError), path, ExportError).data
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: format {snippet(manifest.get('format'))} "
                          f"v{snippet(manifest.get('format_version'))}; this edgevl reads {FORMAT!r} "
                          f"v{FORMAT_VERSION}: re-export with this edgevl")
    if manifest.get("edgevl_version") != __version__:
        raise ExportError(f"{path}: written by edgevl {str(manifest.get('edgevl_version'))[:40]}, this is edgevl "
                          f"{__version__}: re-export the model with this version")
    spec = check_manifest(manifest, export_dir)
    for name, entry in manifest["files"].items():
        file = export_dir / name
        if not file.is_file():
            raise ExportError(f"{file}: listed in {MANIFEST_NAME} but missing (incomplete copy?)")
        if file.stat().st_size != entry["bytes"]:
            raise ExportError(f"{file}: {file.stat().st_size} bytes, {MANIFEST_NAME} says {entry['bytes']} "
                              "(truncated or modified)")
        if verify_checksums and sha256(file) != entry["sha256"]:
            raise ExportError(f"{file}: sha256 does not match {MANIFEST_NAME} (corrupted or modified)")
    _check_embed_table(export_dir / manifest["graphs"]["embed_tokens"], spec)
    return manifest


def check_manifest(manifest: dict, export_dir: Path) -> ModelSpec:
    """Types and ranges of what the runtimes read, and every path the manifest names: relative, inside export_dir
    and listed in `files` (so it is size- and checksum-checked). Returns the spec."""
    m = Fields(manifest, Path(export_dir) / MANIFEST_NAME, ExportError)
    m.get("format_version", int, choices=(FORMAT_VERSION,))  # read_manifest compared it with ==, and True == 1
    files = m.table("files", dict)
    for name, entry in files.items():
        _check_path(m, "files", name, export_dir)
        entry.get("bytes", int, minimum=0)
        if not _SHA256.fullmatch(entry.get("sha256", str)):
            entry.fail("sha256", f"= {snippet(entry.data['sha256'])}: expected 64 lowercase hex digits")
    for kind in REQUIRED_GRAPHS:
        m.get("graphs", dict).get(kind, str)
    named = {f"graphs.{kind}": path for kind, path in m.table("graphs", str).items()}
    tensorrt = m.get("tensorrt", dict, {})
    if tensorrt.data:
        named.update({f"tensorrt.plans.{kind}": path for kind, path in tensorrt.table("plans", str).items()})
    for key, name in named.items():
        _check_path(m, key, name, export_dir)
        if name not in files:
            m.fail(key, f"= {snippet(name)}: not listed in files (sizes and checksums must cover every file)")
    limits, kv_cache, precision = m.get("limits", dict), m.get("kv_cache", dict), m.get("precision", dict)
    limits.get("max_tiles", int, positive=True, maximum=MAX_TILES)
    kv_cache.get("layout", str, choices=KV_LAYOUTS)
    kv_cache.get("dtype", str, choices=KV_DTYPES)
    for kind in ("vision", "decoder"):
        precision.get(kind, str, choices=GRAPH_PRECISIONS)
    m.get("system_message", str, None)
    spec = _check_spec(m.get("spec", dict))
    if spec.tiling.image_size != spec.vision.image_size:
        m.fail("spec.tiling.image_size", f"= {spec.tiling.image_size}: differs from spec.vision.image_size = "
                                         f"{spec.vision.image_size} (tiles are cut at the vision encoder's size)")
    limits.get("max_seq", int, positive=True, maximum=spec.decoder.max_position_embeddings)
    return spec


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


def _check_spec(spec: Fields) -> ModelSpec:
    _check_fields(spec, ModelSpec)
    try:
        return spec_from_dict(spec.data)
    except ValueError as e:  # a dataclass's own check (TilingConfig's min_tiles <= max_tiles)
        raise ExportError(f"{spec.file}: spec: {e}") from None


def _check_fields(section: Fields, cls) -> None:
    """section holds the dataclass cls as spec_to_dict writes it: every field, of its annotated type (null only
    where that allows None), nested specs alike; every number of a spec is a positive size or scale."""
    hints = typing.get_type_hints(cls)
    for name in section.data.keys() - hints.keys():
        section.fail(name, f"is not a field of {cls.__name__}")
    for name, hint in hints.items():
        value, args, optional = section.data.get(name), typing.get_args(hint), type(None) in typing.get_args(hint)
        if value is None:
            if not optional:
                section.fail(name, "is null" if name in section.data else "is missing")
            continue
        if optional:  # X | None
            hint = next(t for t in args if t is not type(None))
        if dataclasses.is_dataclass(hint):
            _check_fields(section.get(name, dict), hint)
        elif typing.get_origin(hint) is tuple:  # tuple[float, ...]
            section.array(name, args[0])
        else:
            section.get(name, hint, positive=hint in (int, float))


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


def check_graph_shapes(export_dir, manifest: dict, graphs: dict[str, dict[str, list]]) -> None:
    """The exported graphs agree with the manifest's spec. graphs: "vision" / "decoder" -> tensor name -> shape as
    the runtime reports it (integers, or names / None for dynamic dimensions, which match any size)."""
    vision, decoder = manifest["spec"]["vision"], manifest["spec"]["decoder"]
    size, hidden, layers = vision["image_size"], decoder["hidden_size"], decoder["num_layers"]
    decoder_file = Path(export_dir) / manifest["graphs"]["decoder"]
    past_names = sorted(n for n in graphs["decoder"] if n.startswith("past_key_values."))
    if len(past_names) != 2 * layers:  # counted first: the spec's layer count is not trusted to size a loop
        _graph_mismatch(decoder_file, f"{len(past_names)} past_key_values inputs; the spec has {layers} layers")
    past = [None, decoder["num_kv_heads"], None, hidden // decoder["num_heads"]]
    expected = {"vision": {"pixel_values": [None, 3, size, size], "image_embeds": [None, None, hidden]},
                "decoder": {"inputs_embeds": [None, None, hidden],
                            **{f"past_key_values.{i}.{kv}": past for i in range(layers) for kv in ("key", "value")}}}
    for kind, tensors in expected.items():
        file, have = Path(export_dir) / manifest["graphs"][kind], graphs[kind]
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
