"""A build folder that cannot be trusted is refused by name, never half-read: no manifest, a manifest
that is not JSON (or not an object), another format or version, no stages, a key a reader needs
missing or of the wrong type, a graph file or the tokenizer folder missing, a graph's external data
missing (a partial copy)."""
from __future__ import annotations

import json
import re
import shutil

import onnx
import pytest

from conftest import assert_one_line_error
from vlm_export.errors import ManifestError
from vlm_export.manifest import FORMAT, VERSION, check_hashes, read_manifest, sha256_file, verify_hashes, write_manifest
from vlm_export.runtime.load import open_build


@pytest.fixture
def build(tiny_build, tmp_path):
    dest = tmp_path / "build"
    shutil.copytree(tiny_build("llava-llama").path, dest)
    return dest


def rewrite(build, change) -> None:
    manifest = json.loads((build / "manifest.json").read_text())
    change(manifest)
    (build / "manifest.json").write_text(json.dumps(manifest))


def test_no_manifest(build, tmp_path):
    (build / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=r"manifest.json not found: .*build is not a vlm-export build folder"):
        read_manifest(build)
    failed = tmp_path / "build.failed"  # what a failed build leaves: its manifest renamed
    build.rename(failed)
    with pytest.raises(ManifestError, match=r"this is a failed build: read its report.md"):
        read_manifest(failed)


@pytest.mark.parametrize("text", ['{"format": "vlm-export-build", "vers', "", "\xff\xfe not text"])
def test_manifest_that_is_not_json(build, text):
    (build / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ManifestError, match=r"manifest.json is not valid JSON .*; rebuild"):
        read_manifest(build)


@pytest.mark.parametrize("text", ["[1, 2]", '"a build"', "null"])
def test_manifest_that_is_json_but_not_an_object(build, text):
    (build / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match=r"manifest.json is not a vlm-export manifest"):
        read_manifest(build)


@pytest.mark.parametrize("field,value,message", [
    ("version", VERSION - 1, rf"format 'vlm-export-build' version {VERSION - 1}; this vlm-export reads "
                             rf"'vlm-export-build' version {VERSION}: rebuild with this version"),
    ("version", VERSION + 1, rf"version {VERSION + 1}; this vlm-export reads"),
    ("format", "some-other-tool", r"format 'some-other-tool' version"),
])
def test_other_format_or_version(build, field, value, message):
    rewrite(build, lambda m: m.update({field: value}))
    with pytest.raises(ManifestError, match=message):
        read_manifest(build)


def test_no_stages(build):
    rewrite(build, lambda m: m.update(stages=[]))
    with pytest.raises(ManifestError, match="declares no stages; rebuild"):
        read_manifest(build)


@pytest.mark.parametrize("change,message", [
    (lambda m: m.update(stages="banana"), "'stages' is str, not a JSON list"),
    (lambda m: m.update(stages=[{"kind": "vision"}]), "a stage has no name"),
    (lambda m: m.pop("limits"), "'limits' is missing, not a JSON object"),
    (lambda m: m["limits"].pop("max_sequence"), "limits.max_sequence is missing"),
    (lambda m: m["limits"].update(max_sequence="lots"), "limits.max_sequence is 'lots', not an integer >= 1"),
    (lambda m: m["limits"].update(max_batch=0), "limits.max_batch is 0, not an integer >= 1"),
    (lambda m: m["limits"].update(max_images=-1), "limits.max_images is -1, not an integer >= 0"),
    (lambda m: m["generation"].update(eos_token_ids="2"), "generation.eos_token_ids is not a list of token ids"),
    (lambda m: m["generation"].update(bad_words_ids=[[3], []]), "generation.bad_words_ids is [[3], []], not a list"),
    (lambda m: m["generation"].update(sequence_bias=[[[3], "up"]]), "generation.sequence_bias is [[[3], 'up']], not a"),
    (lambda m: m["graphs"].update(projector="graphs/projector.onnx"), "the projector graph listed in the manifest is missing"),
    (lambda m: m["scheme"].update(name="warp"), "its scheme cannot be read (ValueError: unknown decoding scheme 'warp'"),
    (lambda m: m["scheme"].pop("geometry"), "its scheme cannot be read (KeyError"),
    (lambda m: m["prompt_layout"].update(kind="sideways"), "its prompt_layout cannot be read (ValueError: prompt layout"),
    (lambda m: m["stages"][0].update(kind="audio"), "its stages cannot be read"),
    (lambda m: m["stages"][0].pop("inputs"), "its stages cannot be read"),
    (lambda m: m["graphs"]["projector"].update(sha256="abc"), "the projector graph's entry has no file name or no sha256"),
    (lambda m: m["graphs"]["projector"].update(file="/etc/passwd"), "names '/etc/passwd', a file outside the build folder"),
    (lambda m: m["graphs"]["projector"]["sha256"].update({"../x.onnx": "0"}), "names '../x.onnx', a file outside"),
])
def test_damaged_structure_is_one_line(build, run_cli, change, message):
    """A manifest edited by hand fails where it is read, by name, for every command that reads it
    (a reader deep inside would raise a KeyError or TypeError instead)."""
    rewrite(build, change)
    with pytest.raises(ManifestError, match=re.escape(message)):
        read_manifest(build)
    for command in (["generate", str(build), "--prompt", "hi"], ["repository", str(build), "--out", str(build.parent / "r")]):
        assert_one_line_error(run_cli(*command), message)
    assert not (build.parent / "r").exists()


def test_missing_tokenizer_folder_is_named_not_fetched(build, run_cli):
    shutil.rmtree(build / "tokenizer")
    with pytest.raises(ManifestError, match=r"the tokenizer folder listed in the manifest \(tokenizer\) is missing"):
        read_manifest(build)
    assert_one_line_error(run_cli("generate", str(build), "--prompt", "hi"), "tokenizer folder")


@pytest.mark.parametrize("damage", ["delete", "truncate"])
@pytest.mark.parametrize("name", ["tokenizer.json", "chat_template.jinja", "preprocessor_config.json"])
def test_a_damaged_tokenizer_file_is_named(build, run_cli, name, damage):
    """Hashed like the graphs: a lost chat template would otherwise change every prompt without a sign, a lost
    tokenizer.json fail deep inside transformers, and `repository` would copy either into a repository."""
    path = build / "tokenizer" / name
    assert path.is_file() and f"tokenizer/{name}" in read_manifest(build)["tokenizer_sha256"]
    path.unlink() if damage == "delete" else path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(ManifestError, match=f"tokenizer/{name} changed since the build"):
        open_build(build)
    for command in (["generate", str(build), "--prompt", "hi"], ["repository", str(build), "--out", str(build.parent / "r")]):
        assert_one_line_error(run_cli(*command), f"tokenizer/{name} changed since the build")
    assert not (build.parent / "r").exists()


def test_missing_graph_file(build, capsys):
    from vlm_export.cli import main

    (build / "graphs" / "projector.onnx").unlink()
    with pytest.raises(ManifestError, match="the projector graph listed in the manifest is missing; rebuild"):
        read_manifest(build)
    rewrite(build, lambda m: m["graphs"].pop("vision_encoder"))  # listed as a stage, absent from the graphs
    with pytest.raises(ManifestError, match="the vision_encoder graph listed in the manifest is missing"):
        read_manifest(build)
    assert main(["generate", str(build), "--prompt", "hi", "--max-tokens", "2"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "graph listed in the manifest is missing" in errors[0]


def test_missing_external_data_is_named(build):
    """A graph whose weights live in a .data file (as every graph over 2 GB does), copied without
    it: the hash check names the missing file instead of failing on it."""
    manifest = read_manifest(build)
    entry = manifest["graphs"]["projector"]
    graph = build / entry["file"]
    onnx.save(onnx.load(str(graph)), str(graph), save_as_external_data=True, location="projector.onnx.data",
              size_threshold=0)
    data = graph.with_name("projector.onnx.data")
    entry["sha256"] = {entry["file"]: sha256_file(graph), "graphs/projector.onnx.data": sha256_file(data)}
    write_manifest(build, {k: v for k, v in manifest.items() if k not in ("format", "version")})
    assert verify_hashes(build, read_manifest(build)) == []
    open_build(build)  # complete: opens

    data.unlink()
    assert verify_hashes(build, read_manifest(build)) == ["graphs/projector.onnx.data"]
    with pytest.raises(ManifestError, match=r"graphs/projector.onnx.data changed since the build"):
        check_hashes(build, read_manifest(build))
    with pytest.raises(ManifestError, match=r"graphs/projector.onnx.data"):
        open_build(build)


def test_written_manifest_reads_back(build):
    manifest = read_manifest(build)
    assert (manifest["format"], manifest["version"]) == (FORMAT, VERSION)
    write_manifest(build, {k: v for k, v in manifest.items() if k not in ("format", "version")})
    assert read_manifest(build) == manifest
