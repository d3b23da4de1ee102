"""The export manifest: everything a runtime needs to run an exported directory (onnxruntime-genai's
genai_config.json idea). The runtime reads this, never the original checkpoint. Torch-free."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_NAME = "manifest.json"
FORMAT = "edgevl-export"
FORMAT_VERSION = 1


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
    """Read and check an exported directory: format, edgevl version, every file present, sizes and checksums."""
    from . import __version__

    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(f"{path}: missing; not an edgevl export (run `edgevl export` first)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')}; this "
                          f"edgevl reads {FORMAT!r} v{FORMAT_VERSION}: re-export with this edgevl")
    if manifest.get("edgevl_version") != __version__:
        raise ExportError(f"{path}: written by edgevl {manifest.get('edgevl_version')}, this is edgevl "
                          f"{__version__}: re-export the model with this version")
    for name, entry in manifest.get("files", {}).items():
        file = export_dir / name
        if not file.is_file():
            raise ExportError(f"{file}: listed in {MANIFEST_NAME} but missing (incomplete copy?)")
        if file.stat().st_size != entry["bytes"]:
            raise ExportError(f"{file}: {file.stat().st_size} bytes, {MANIFEST_NAME} says {entry['bytes']} "
                              "(truncated or modified)")
        if verify_checksums and sha256(file) != entry["sha256"]:
            raise ExportError(f"{file}: sha256 does not match {MANIFEST_NAME} (corrupted or modified)")
    return manifest
