"""Malformed and hostile files: every one edgevl reads raises CheckpointError / ExportError naming the file and the
field, before any large allocation. Examples per defect class, then Hypothesis fuzzing of each format."""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict, replace
from functools import reduce
from operator import getitem

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgevl.checkpoint
from edgevl import EdgeVL
from edgevl.checkpoint import SAFETENSORS_DTYPES, load_checkpoint, read_safetensors
from edgevl.manifest import (ExportError, check_graph_shapes, file_entry, manifest_from_dict, read_manifest,
                             write_manifest)
from edgevl.specs import CheckpointError
from edgevl.testing.checkpoints import write_safetensors

FUZZ = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16)
# Fresh copies: a mutation that lands inside a drawn [1, 2] must not change the list the next example draws.
EDGE_VALUES = st.sampled_from([0, -1, 1, 2**63, 1.5, float("nan"), "", "64", [], {}, None, True, [1, 2],
                               "../x"]).map(copy.deepcopy)


def _write_header(path, header, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def _paths(value, prefix=()):
    """Every key path into a JSON document."""
    if prefix:
        yield prefix
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from _paths(child, prefix + (key,))


def _mutate(data, document):
    """document with one to three values replaced by random JSON, or their keys deleted."""
    document = copy.deepcopy(document)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(document))
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = reduce(getitem, path[:-1], document)
        if isinstance(parent, dict) and data.draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(EDGE_VALUES | JSON)
    return document


def _edit(document, path, value):
    """document with the value at path ("a.b", or a tuple for keys holding dots) replaced, or deleted."""
    *parents, last = path.split(".") if isinstance(path, str) else path
    target = reduce(getitem, parents, document)
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return document


_DELETE = object()


# -- safetensors ------------------------------------------------------------------------------------------------

def test_safetensors_header_length_over_the_format_limit_is_refused_unread(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: header length 4611686018427387904 bytes, over "
                                              r"the safetensors format's limit"):
        read_safetensors(path)
    path.write_bytes((1000).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: header length 1000 bytes, but the file has 2"):
        read_safetensors(path)


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]}}


@pytest.mark.parametrize("edit, message", [
    (lambda h: [h], r"the header is \[\{.*a safetensors header is a JSON object"),
    (lambda h: {**h, "a": [1]}, r"tensor \"a\" is \[1\]; expected an object with dtype, shape and data_offsets"),
    (lambda h: _edit(h, "a.dtype", _DELETE), r"tensor \"a\" has unsupported dtype null"),
    (lambda h: _edit(h, "a.dtype", ["F32"]), r"tensor \"a\" has unsupported dtype \[\"F32\"\]"),
    (lambda h: _edit(h, "a.shape", "2x2"), r"tensor \"a\": shape = \"2x2\"; expected a list of non-negative"),
    (lambda h: _edit(h, "a.shape", [-2, -2]), r"tensor \"a\": shape = \[-2, -2\]"),
    (lambda h: _edit(h, "a.shape", [2.0, 2]), r"tensor \"a\": shape = \[2.0, 2\]"),
    (lambda h: _edit(h, "a.data_offsets", [0]), r"tensor \"a\": data_offsets = \[0\]; expected \[start, end\]"),
    (lambda h: _edit(h, "a.data_offsets", [16, 0]), r"tensor \"a\": data_offsets = \[16, 0\]"),
    (lambda h: _edit(h, "a.data_offsets", [0, 100]), r"tensor \"a\" ends at byte 100, past the file's end"),
    (lambda h: _edit(h, "a.shape", [2, 3]), r"tensor \"a\": data_offsets \[0, 16\] span 16 bytes, but shape "
                                            r"\[2, 3\] of F32 takes 24"),
    (lambda h: _edit(h, "b.data_offsets", [8, 16]), r"tensors \"a\" and \"b\" share bytes 8\.\.16"),
    (lambda h: {**h, "__metadata__": {"format": 1}}, r"__metadata__ is \{\"format\": 1\}; expected an object of"),
])
def test_safetensors_header_fields_are_checked(tmp_path, edit, message):
    path = tmp_path / "model.safetensors"
    _write_header(path, edit(copy.deepcopy(GOOD)), bytes(24))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: " + message):
        read_safetensors(path)


def test_no_array_is_made_before_the_whole_header_is_checked(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    _write_header(path, {**GOOD, "c": {"dtype": "F32", "shape": [1], "data_offsets": [24, 99]}}, bytes(24))
    monkeypatch.setattr(edgevl.checkpoint.np, "memmap", lambda *a, **k: pytest.fail("mapped before the check"))
    with pytest.raises(CheckpointError, match=r"tensor \"c\" ends at byte 99"):
        read_safetensors(path)


def test_valid_safetensors_still_load(tmp_path):
    tensors = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "empty": np.zeros((0, 4), np.float32)}
    write_safetensors(tmp_path / "m.safetensors", tensors, "float32")
    loaded = read_safetensors(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(loaded["x"], tensors["x"])
    assert loaded["empty"].shape == (0, 4)


@pytest.mark.parametrize("index, message", [
    ([], r"the top level is \[\]; expected a JSON object"),
    ({"weight_map": ["a"]}, r"weight_map = \[\"a\"\]: expected an object"),
    ({"weight_map": {}}, r"weight_map is empty"),
    ({"weight_map": {"w": 3}}, r"weight_map\.w = 3: expected a string"),
    ({"weight_map": {"w": "../outside.safetensors"}}, r"weight_map names shard \"\.\./outside\.safetensors\"; "
                                                     r"shards must be files inside"),
    ({"weight_map": {"w": "/etc/passwd"}}, r"weight_map names shard \"/etc/passwd\""),
])
def test_shard_index_is_checked(tiny_checkpoint, tmp_path, index, message):
    d = shutil.copytree(tiny_checkpoint("qwen2", shards=2), tmp_path / "m")
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: " + message):
        load_checkpoint(d)


def _check_loaded(tensors: dict, header: dict) -> None:
    """A header the reader accepted: every array is exactly its byte range, and no two ranges overlap."""
    spans = sorted(tuple(header[n]["data_offsets"]) for n, a in tensors.items() if a.nbytes)
    for name, array in tensors.items():
        start, end = header[name]["data_offsets"]
        assert array.nbytes == end - start and list(array.shape) == header[name]["shape"]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


ENTRY = st.fixed_dictionaries({"dtype": st.sampled_from([*SAFETENSORS_DTYPES, "F8", 4, None]),
                               "shape": st.lists(st.integers(-1, 4), max_size=3),
                               "data_offsets": st.lists(st.integers(-1, 40), max_size=3)})


@FUZZ
@given(header=JSON | st.dictionaries(st.text(max_size=4), ENTRY | JSON, max_size=4), data=st.binary(max_size=48))
def test_fuzz_safetensors_json_headers(tmp_path, header, data):
    path = tmp_path / "fuzz.safetensors"
    _write_header(path, header, data)
    try:
        tensors = read_safetensors(path)
    except CheckpointError:
        return
    _check_loaded(tensors, header)


@FUZZ
@given(length=st.integers(0, 2**64 - 1) | st.integers(0, 64), rest=st.binary(max_size=128))
def test_fuzz_safetensors_bytes(tmp_path, length, rest):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(length.to_bytes(8, "little") + rest)
    try:
        read_safetensors(path)
    except CheckpointError:
        pass


# -- config.json ------------------------------------------------------------------------------------------------

def _with_config(tiny_checkpoint, tmp_path, config, family="qwen2", fmt="original"):
    d = tmp_path / "m"
    if not d.exists():
        shutil.copytree(tiny_checkpoint(family, fmt), d)
    (d / "config.json").write_text(json.dumps(config))
    return d


def _config(tiny_checkpoint, family="qwen2", fmt="original") -> dict:
    return json.loads((tiny_checkpoint(family, fmt) / "config.json").read_text())


@pytest.mark.parametrize("path, value, message", [
    ("llm_config.hidden_size", "64", r"llm_config\.hidden_size = \"64\": expected an integer"),
    ("llm_config.hidden_size", True, r"llm_config\.hidden_size = true: expected an integer"),
    ("llm_config.hidden_size", _DELETE, r"llm_config\.hidden_size is missing"),
    ("vision_config.hidden_size", None, r"vision_config\.hidden_size is null"),
    ("llm_config", [], r"llm_config = \[\]: expected an object"),
    ("llm_config.num_attention_heads", 0, r"llm_config\.num_attention_heads = 0: expected >= 1"),
    ("llm_config.num_attention_heads", 3, r"llm_config\.hidden_size = 64: not divisible by "
                                          r"llm_config\.num_attention_heads = 3"),
    ("llm_config.num_key_value_heads", 3, r"llm_config\.num_key_value_heads = 3: does not divide"),
    ("llm_config.num_hidden_layers", 10**12, r"llm_config\.num_hidden_layers = 1000000000000: expected >= 1 and "
                                             r"<= 1024"),
    ("llm_config.rms_norm_eps", -1e-6, r"llm_config\.rms_norm_eps = -1e-06: expected > 0"),
    ("llm_config.rope_theta", "1e6", r"llm_config\.rope_theta = \"1e6\": expected a number"),
    ("llm_config.architectures", "Qwen2ForCausalLM", r"llm_config\.architectures = \"Qwen2ForCausalLM\": expected "
                                                     r"an array"),
    ("vision_config.num_hidden_layers", -1, r"vision_config\.num_hidden_layers = -1: expected >= 1"),
    ("vision_config.patch_size", 15, r"vision_config\.patch_size = 15: does not divide the image size 448"),
    ("select_layer", -5, r"select_layer = -5: expected >= -2 and <= -1"),
    ("downsample_ratio", 0, r"downsample_ratio = 0\.0: expected > 0"),
    ("downsample_ratio", 0.3, r"downsample_ratio = 0\.3: expected 1/n for an n that divides the 32 patches"),
    ("max_dynamic_patch", 0, r"max_dynamic_patch = 0: expected >= 1"),
    ("min_dynamic_patch", 13, r"min_dynamic_patch = 13: more than max_dynamic_patch = 12"),
    ("use_thumbnail", "yes", r"use_thumbnail = \"yes\": expected true or false"),
    ("ps_version", "v3", r"ps_version = \"v3\": expected one of v1, v2"),
])
def test_config_values_are_checked(tiny_checkpoint, tmp_path, path, value, message):
    config = _edit(_config(tiny_checkpoint), path, value)
    with pytest.raises(CheckpointError, match=r"config\.json: " + message):
        load_checkpoint(_with_config(tiny_checkpoint, tmp_path, config))


def test_config_that_is_not_an_object(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json: the top level is \[1, 2\]; expected a JSON object"):
        load_checkpoint(_with_config(tiny_checkpoint, tmp_path, [1, 2]))


def test_longrope_factors_are_checked(tiny_checkpoint, tmp_path):
    config = _edit(_config(tiny_checkpoint, "phi3"), "llm_config.rope_scaling.short_factor", [1.0, "x"] + [1.0] * 6)
    with pytest.raises(CheckpointError, match=r"config\.json: llm_config\.rope_scaling\.short_factor\[1\] = \"x\": "
                                              r"expected a number"):
        load_checkpoint(_with_config(tiny_checkpoint, tmp_path, config, "phi3"))


def test_hf_preprocessor_config_is_checked(tiny_checkpoint, tmp_path):
    d = _with_config(tiny_checkpoint, tmp_path, _config(tiny_checkpoint, fmt="hf"), fmt="hf")
    (d / "preprocessor_config.json").write_text(json.dumps({"max_patches": "12"}))
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json: max_patches = \"12\": expected an integer"):
        load_checkpoint(d)
    (d / "preprocessor_config.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json: the top level is \[\]"):
        load_checkpoint(d)


@FUZZ
@given(config=JSON)
def test_fuzz_config_random_json(tiny_checkpoint, tmp_path, config):
    with pytest.raises(CheckpointError):
        load_checkpoint(_with_config(tiny_checkpoint, tmp_path, config))


@FUZZ
@given(data=st.data(), source=st.sampled_from([("qwen2", "original"), ("phi3", "original"), ("internlm2", "hf")]))
def test_fuzz_config_mutations(tiny_checkpoint, tmp_path, data, source):
    config = _mutate(data, _config(tiny_checkpoint, *source))
    directory = tmp_path / "-".join(source)
    try:
        load_checkpoint(_with_config(tiny_checkpoint, directory, config, *source))
    except CheckpointError:
        pass


def test_valid_configs_still_load(tiny_checkpoint):
    for family, fmt in [("qwen2", "original"), ("phi3", "original"), ("internlm2", "hf"), ("phi3", "hf")]:
        assert load_checkpoint(tiny_checkpoint(family, fmt)).spec.decoder.family in (family, "llama")


# -- manifest.json ----------------------------------------------------------------------------------------------

@pytest.fixture
def export_copy(exported, tmp_path):
    return shutil.copytree(exported("qwen2"), tmp_path / "e")


def _manifest(d) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _write(d, manifest) -> None:
    (d / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("path, value, message", [
    ("files", {}, r"files is empty"),
    ("files", _DELETE, r"files is missing"),
    (("files", "vision.onnx"), _DELETE, r"graphs\.vision = \"vision\.onnx\": not listed in files"),
    (("files", "vision.onnx"), {"bytes": "12", "sha256": "0" * 64}, r"files\.vision\.onnx\.bytes = \"12\": expected an "
                                                              r"integer"),
    (("files", "vision.onnx"), {"bytes": 1, "sha256": "abc"}, r"files\.vision\.onnx\.sha256 = \"abc\": expected 64"),
    ("graphs.vision", "/etc/passwd", r"graphs\.vision names \"/etc/passwd\": paths must be relative and stay inside"),
    ("graphs.vision", "../e/vision.onnx", r"graphs\.vision names \"\.\./e/vision\.onnx\""),
    ("graphs.embed_tokens", _DELETE, r"graphs\.embed_tokens is missing"),
    ("graphs", ["vision.onnx"], r"graphs = \[\"vision\.onnx\"\]: expected an object"),
    ("limits.max_tiles", 0, r"limits\.max_tiles = 0: expected >= 1 and <= 64"),
    ("limits.max_seq", "4096", r"limits\.max_seq = \"4096\": expected an integer"),
    ("limits.max_seq", 10**6, r"limits\.max_seq = 1000000: expected >= 1 and <= 8192"),
    ("kv_cache.layout", "paged", r"kv_cache\.layout = \"paged\": expected one of concat, shared"),
    ("kv_cache.dtype", "object", r"kv_cache\.dtype = \"object\": expected one of float32, float16"),
    ("precision.vision", 8, r"precision\.vision = 8: expected a string"),
    ("format_version", True, r"format_version = true: expected an integer"),
    ("system_message", ["hi"], r"system_message = \[\"hi\"\]: expected a string"),
    ("tensorrt", "yes", r"tensorrt = \"yes\": expected an object"),
    ("spec.vision.image_size", "448", r"spec\.vision\.image_size = \"448\": expected an integer"),
    ("spec.decoder.num_heads", 0, r"spec\.decoder\.num_heads = 0: expected >= 1"),
    ("spec.decoder.num_heads", _DELETE, r"spec\.decoder\.num_heads is missing"),
    ("spec.decoder.rope_theta", None, r"spec\.decoder\.rope_theta is null"),
    ("spec.decoder.heads", 4, r"spec\.decoder\.heads is not a field of DecoderSpec"),
    ("spec.tiling.min_tiles", 13, r"spec: TilingConfig needs 1 <= min_tiles <= max_tiles"),
    ("spec.tiling.image_size", 224, r"spec\.tiling\.image_size = 224: differs from spec\.vision\.image_size"),
])
def test_manifest_values_are_checked(export_copy, path, value, message):
    _write(export_copy, _edit(_manifest(export_copy), path, value))
    with pytest.raises(ExportError, match=r"manifest\.json: " + message):
        read_manifest(export_copy)


def test_manifest_that_is_not_an_object(export_copy):
    (export_copy / "manifest.json").write_text("[]")
    with pytest.raises(ExportError, match=r"manifest\.json: the top level is \[\]; expected a JSON object"):
        read_manifest(export_copy)


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, r"not valid JSON \(maximum recursion depth"),
    ('{"a": ' + "1" * 5000 + "}", r"not valid JSON \(Exceeds the limit"),
    (None, r"17825792 bytes; a \w+\.json is kilobytes, refusing to read over 16777216"),
])
def test_json_that_is_too_deep_or_too_large_is_refused(tiny_checkpoint, export_copy, tmp_path, text, message):
    checkpoint = shutil.copytree(tiny_checkpoint("qwen2"), tmp_path / "m")
    for path, load, error in [(checkpoint / "config.json", load_checkpoint, CheckpointError),
                              (export_copy / "manifest.json", read_manifest, ExportError)]:
        if text is None:
            with open(path, "r+b") as f:
                f.truncate(17 << 20)  # sparse: nothing is written, and the reader must not read it either
        else:
            path.write_text(text)
        with pytest.raises(error, match=path.name.replace(".", r"\.") + ": " + message):
            load(path.parent)


def test_emptied_files_table_does_not_switch_checks_off(export_copy):
    (export_copy / "vision.onnx").write_bytes(b"tampered")
    _write(export_copy, {**_manifest(export_copy), "files": {}})
    with pytest.raises(ExportError, match=r"manifest\.json: files is empty"):
        EdgeVL.from_pretrained(export_copy)


def test_links_out_of_the_export_are_refused(export_copy, tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"outside the export")
    (export_copy / "extra.bin").symlink_to(outside)
    manifest = _manifest(export_copy)
    manifest["files"]["extra.bin"] = asdict(file_entry(export_copy / "extra.bin"))
    _write(export_copy, manifest)
    with pytest.raises(ExportError, match=r"manifest\.json: files names \"extra\.bin\": .*links out of it"):
        read_manifest(export_copy)


def _rerecord(d, edit=lambda manifest: None) -> None:
    """Edit the manifest and record the files again, so sizes and checksums match: only the checks under test
    can catch what the edit broke."""
    manifest = _manifest(d)
    edit(manifest)
    write_manifest(d, manifest_from_dict(manifest))


def test_embed_table_is_checked_against_the_spec(export_copy):
    np.save(export_copy / "embed_tokens.npy", np.zeros((5, 64), np.float32))
    _rerecord(export_copy)
    with pytest.raises(ExportError, match=r"embed_tokens\.npy: float32 \[5, 64\]; .*\[vocab_size, hidden_size\] = "):
        read_manifest(export_copy)
    (export_copy / "embed_tokens.npy").write_bytes(b"not numpy")
    _rerecord(export_copy)
    with pytest.raises(ExportError, match=r"embed_tokens\.npy: not a \.npy array"):
        read_manifest(export_copy)


@pytest.mark.parametrize("path, value, message", [
    ("spec.vision.image_size", 224, r"vision\.onnx: pixel_values has shape \[tiles, 3, 448, 448\]; the spec implies "
                                    r"\[\*, 3, 224, 224\]"),
    ("spec.decoder.num_kv_heads", 4, r"decoder\.onnx: past_key_values\.0\.key has shape \[1, 2, past, 16\]; the spec "
                                     r"implies \[\*, 4, \*, 16\]"),
    ("spec.decoder.num_layers", 3, r"decoder\.onnx: 4 past_key_values inputs; the spec has 3 layers"),
])
def test_spec_is_checked_against_the_graphs(export_copy, path, value, message):
    def edit(manifest):
        _edit(manifest, path, value)
        manifest["spec"]["tiling"]["image_size"] = manifest["spec"]["vision"]["image_size"]

    _rerecord(export_copy, edit)
    read_manifest(export_copy)  # consistent in itself: only the graphs can tell
    with pytest.raises(ExportError, match=message):
        EdgeVL.from_pretrained(export_copy)


def test_graph_shape_check_is_plain_data(exported):
    manifest = read_manifest(exported("qwen2"))
    one_layer = replace(manifest.spec.decoder, hidden_size=64, num_heads=4, num_kv_heads=2, num_layers=1)
    manifest = replace(manifest, spec=replace(manifest.spec, decoder=one_layer),
                       graphs=replace(manifest.graphs, vision="v.onnx", decoder="d.onnx"))
    graphs = {"vision": {"pixel_values": ["n", 3, 448, 448], "image_embeds": ["n", 256, 64]},
              "decoder": {"inputs_embeds": [1, "s", 64], "past_key_values.0.key": [1, 2, "p", 16],
                          "past_key_values.0.value": [1, 2, None, 16]}}
    check_graph_shapes("/x", manifest, graphs)
    graphs["vision"]["image_embeds"] = ["n", 256, 32]
    with pytest.raises(ExportError, match=r"/x/v\.onnx: image_embeds has shape \[n, 256, 32\]; the spec implies "
                                          r"\[\*, \*, 64\]"):
        check_graph_shapes("/x", manifest, graphs)


@pytest.fixture
def graph_shapes(exported):
    import onnxruntime as ort

    d, shapes = exported("qwen2"), {}
    for kind in ("vision", "decoder"):
        session = ort.InferenceSession(str(d / f"{kind}.onnx"))
        shapes[kind] = {t.name: t.shape for t in session.get_inputs() + session.get_outputs()}
    return shapes


@FUZZ
@given(manifest=JSON)
def test_fuzz_manifest_random_json(export_copy, manifest):
    _write(export_copy, manifest)
    with pytest.raises(ExportError):
        read_manifest(export_copy)


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_mutations(exported, export_copy, graph_shapes, data):
    manifest = _mutate(data, _manifest(exported("qwen2")))
    _write(export_copy, manifest)
    try:
        checked = read_manifest(export_copy)
        check_graph_shapes(export_copy, checked, graph_shapes)
    except ExportError:
        pass


def test_valid_export_still_loads(exported):
    assert EdgeVL.from_pretrained(exported("qwen2")).backend.max_seq == 4096


def test_a_graph_onnx_runtime_cannot_load_names_the_file(exported, tmp_path):
    """Checksums that match a replaced graph (a manifest rewritten with it) still end in ExportError, not in one
    of ONNX Runtime's own exception classes."""
    out = tmp_path / "export"
    shutil.copytree(exported("qwen2"), out)
    (out / "vision.onnx").write_bytes(b"\x08\x07 not a protobuf graph")
    write_manifest(out, manifest_from_dict(_manifest(out)))
    with pytest.raises(ExportError, match=r"vision\.onnx: ONNX Runtime .* cannot load it"):
        EdgeVL.from_pretrained(out)
