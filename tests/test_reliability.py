"""What keeps a build and a server trustworthy when inputs or files are bad: image bombs refused
from the header, graphs that changed since the build refused by every opener, a killed build's
leftovers cleaned, and a python repository that loads only the models it uses."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import assert_one_line_error  # noqa: E402
from test_serving import bomb_png
from vlm_export.atomic import atomic_folder, remove_stale_siblings
from vlm_export.errors import BuildError, InputError, ManifestError, RepositoryError
from vlm_export.model_repository.python_models.common import check_files
from vlm_export.model_repository.render import RepositoryOptions, model_configs, render_repository
from vlm_export.runtime.images import ImageLimits, load_image
from vlm_export.runtime.load import open_build


def test_decompression_bomb_refused_from_its_header(tiny_build):
    pipe = open_build(tiny_build("llava-llama").path)
    bomb = bomb_png(12000, 12000)  # 144 M pixels declared in 100 bytes
    assert len(bomb) < 200
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"12000x12000 pixels .*max_image_pixels"):
        pipe.pixel_values([bomb])
    assert time.perf_counter() - start < 5  # refused before decoding (decoding would take seconds and GBs)
    # past Pillow's own limit (~179 M pixels) its header check fires first: the same advice, not Pillow's text
    with pytest.raises(InputError, match=r"declares more than \d+ M pixels; at most 67.1 M .*max_image_pixels.*resize"):
        pipe.pixel_values([bomb_png(20000, 20000)])
    # a strip of few pixels that resizing its short side would blow up (GBs) is refused from its header too
    with pytest.raises(InputError, match=r"300000x1 pixels, more than 200 times as long as it is wide; crop or pad"):
        pipe.pixel_values([bomb_png(300000, 1)])
    from PIL import Image

    assert pipe.pixel_values([Image.new("RGB", (400, 2), (9, 99, 199))]).shape[0] == 1  # 200:1 still passes
    # the limit follows the model's input size (32x32 here: the 64 M pixel floor applies)
    assert pipe.image_limits.max_pixels == 8192 * 8192
    assert ImageLimits.for_input(1024, 1024).max_pixels == 64 * 1024 * 1024
    # an ordinary photo passes; a limit set lower refuses it, bytes first
    from io import BytesIO

    buf = BytesIO()
    Image.new("RGB", (300, 200), (9, 99, 199)).save(buf, format="PNG")
    assert load_image(buf.getvalue()).size == (300, 200)
    with pytest.raises(InputError, match="max_image_pixels"):
        load_image(buf.getvalue(), ImageLimits(max_pixels=300 * 199))
    with pytest.raises(InputError, match="max_image_bytes"):
        load_image(buf.getvalue(), ImageLimits(max_bytes=100))
    with pytest.raises(InputError, match=r"image 1 cannot be decoded: it is damaged"):
        pipe.pixel_values([buf.getvalue(), buf.getvalue()[:120]])


def test_repository_carries_the_image_limits(tiny_build):
    manifest = json.loads((tiny_build("llava-llama").path / "manifest.json").read_text())
    configs = model_configs(manifest, RepositoryOptions(max_image_pixels=1000, max_image_mb=2))
    for model in ("preprocess", "vlm"):
        params = configs[model]["parameters"]
        assert params["max_image_pixels"]["string_value"] == "1000"
        assert params["max_image_bytes"]["string_value"] == str(2 << 20)
    with pytest.raises(RepositoryError, match="image limits"):
        RepositoryOptions(max_image_mb=0)


@pytest.fixture
def tampered(tiny_build, tmp_path):
    """A copy of a build with 1,000 bytes of the decoder's weights flipped (same size, still a
    valid graph: the bytes are inside the largest weight's raw data)."""
    import onnx

    build = tmp_path / "tampered"
    shutil.copytree(tiny_build("llava-llama").path, build)
    graph = build / "graphs" / "lm_decoder.onnx"
    data = bytearray(graph.read_bytes())
    largest = max(onnx.load(str(graph)).graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    start = data.find(largest[:256]) + len(largest) // 2
    assert start > 256 and len(largest) > 4000
    data[start:start + 1000] = bytes(b ^ 0x5A for b in data[start:start + 1000])
    graph.write_bytes(bytes(data))
    return build


def test_changed_graphs_are_refused(tampered, tmp_path, run_cli):
    with pytest.raises(ManifestError, match=r"graphs/lm_decoder.onnx changed since the build.*--no-hash-check"):
        open_build(tampered)
    assert_one_line_error(run_cli("generate", str(tampered), "--prompt", "hi", "--max-tokens", "2"),
                          "lm_decoder.onnx changed since the build", "--no-hash-check")
    assert_one_line_error(run_cli("repository", str(tampered), "--out", str(tmp_path / "repo")),
                          "lm_decoder.onnx changed since the build")
    assert not (tmp_path / "repo").exists()
    # skipping the check is possible, and said so: the graph still loads (the flipped bytes are weights)
    result = run_cli("generate", str(tampered), "--prompt", "hi", "--max-tokens", "2", "--no-hash-check")
    assert result.returncode == 0, result.stderr[-1000:]
    # bytes that break the graph's structure, the check skipped: a damaged graph, in one line
    projector = tampered / "graphs" / "projector.onnx"
    projector.write_bytes(bytes(b ^ 0xFF for b in projector.read_bytes()[:64]) + projector.read_bytes()[64:])
    assert_one_line_error(run_cli("repository", str(tampered), "--out", str(tmp_path / "repo"), "--no-hash-check"),
                          "projector.onnx is not a readable ONNX graph", "damaged")
    assert not (tmp_path / "repo").exists()


def test_python_models_check_their_own_copies(tiny_build, tmp_path):
    """A repository rendered from an intact build whose files were damaged afterwards: each python
    model refuses to load its changed graph (Triton then reports the model not ready)."""
    repo = render_repository(tiny_build("llava-llama").path, tmp_path / "repo")
    config = json.loads(json.dumps(model_configs(json.loads((tiny_build("llava-llama").path / "manifest.json")
                                                            .read_text()), RepositoryOptions())["projector"]))
    check_files(repo / "projector" / "1", config)  # intact: passes
    graph = repo / "projector" / "1" / "model.onnx"
    os.unlink(graph)  # the repository hard-links the build's files: change a private copy
    shutil.copy2(tiny_build("llava-llama").path / "graphs" / "projector.onnx", graph)
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"model.onnx in .*differ from the build's"):
        check_files(repo / "projector" / "1", config)


def test_in_process_decoder_lives_in_the_vlm_model(tiny_build, tmp_path):
    build = tiny_build("llava-llama").path
    repo = render_repository(build, tmp_path / "repo")
    assert not (repo / "lm_decoder").exists()
    assert (repo / "vlm" / "1" / "lm_decoder.fused.onnx").exists()  # the onnxruntime target's form
    bls = render_repository(build, tmp_path / "bls", RepositoryOptions(decoder_mode="bls"))
    assert (bls / "lm_decoder" / "1" / "model.onnx").exists()


def test_killed_writers_leave_nothing_behind_for_long(tmp_path):
    out = tmp_path / "build"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".build.tmp-{dead.stdout.strip()}-0badc0de"
    legacy = tmp_path / ".build.tmp-1a2b3c4d"  # an older vlm-export's name, no process id
    live = tmp_path / f".build.tmp-{os.getpid()}-feedbeef"  # a write still running (this process)
    for folder in (stale, legacy, live):
        (folder / "graphs").mkdir(parents=True)
    with atomic_folder(out, False, BuildError, "build folder", lambda folder: True) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert out.is_dir() and not stale.exists() and not legacy.exists() and live.exists()
    assert remove_stale_siblings(out) == []
    shutil.rmtree(live)


def test_triton_refuses_to_load_a_damaged_graph(tiny_build, tmp_path):
    """The same, end to end: a real tritonserver will not serve the changed graph, and says why."""
    from vlm_export.errors import ServeError
    from vlm_export.serve.server import TritonServer

    repo = render_repository(tiny_build("llava-llama").path, tmp_path / "repo")
    # the two graph models alone: the python models that import transformers (preprocess, vlm) only
    # add their slow loads (30 s here), which Triton waits for before it gives up on the repository
    for model in ("vlm", "image_encoder", "preprocess"):
        shutil.rmtree(repo / model)
    graph = repo / "projector" / "1" / "model.onnx"
    data = bytearray(graph.read_bytes())
    os.unlink(graph)  # a private copy (the repository hard-links the build's files)
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    server = TritonServer(repo, log_file=tmp_path / "triton.log", supervise=False)
    try:
        with pytest.raises(ServeError, match=r"model.onnx in .*projector.*differ from the build's"):
            server.start()
    finally:
        server.stop()
    assert not server.running


def test_exif_orientation_is_applied_as_hugging_face_loads_images(tiny_build, tiny_model_dir, tmp_path):
    """A photo stored sideways with an EXIF orientation tag (as phones save them) is turned upright, as
    transformers' load_image turns it: the pipeline's pixels for its path or bytes equal the model's own
    processor on transformers' loading, and differ from the unturned image's."""
    from PIL import Image
    from transformers import AutoImageProcessor
    from transformers.image_utils import load_image as hf_load_image

    from vlm_export.runtime.images import load_image

    rng = np.random.default_rng(1)
    stored = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    path = tmp_path / "sideways.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    ours, theirs = load_image(path), hf_load_image(str(path))
    assert ours.size == theirs.size == (30, 50)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    pipe = open_build(tiny_build("llava-llama").path)
    processor = AutoImageProcessor.from_pretrained(tiny_model_dir("llava-llama"))
    want = processor(images=[theirs], return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(pipe.pixel_values([path.read_bytes()]), want)
    np.testing.assert_array_equal(pipe.pixel_values([str(path)]), want)
    assert not np.array_equal(processor(images=[Image.open(path).convert("RGB")], return_tensors="np")["pixel_values"], want)


def test_transparent_images_are_seen_over_white_as_hugging_face_sees_them(tiny_build, tiny_model_dir):
    """An RGBA or palette-transparent PNG gives the pixels the model's own processor gives (its
    convert_to_rgb: over white), not the colour hidden under the transparency; where the processor never
    converts (do_convert_rgb off), what Hugging Face's load_image makes of it (a plain RGB conversion)."""
    from io import BytesIO

    from PIL import Image
    from transformers import AutoImageProcessor
    from transformers.image_transforms import convert_to_rgb

    from vlm_export.runtime.images import as_rgb

    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA")
    palette = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).convert("P")
    palette.info["transparency"] = 7
    for image in (rgba, rgba.convert("LA"), palette):
        assert np.array_equal(np.asarray(as_rgb(image)), np.asarray(convert_to_rgb(image))), image.mode
    buf = BytesIO()
    rgba.save(buf, format="PNG")
    pipe = open_build(tiny_build("llava-llama").path)
    theirs = AutoImageProcessor.from_pretrained(tiny_model_dir("llava-llama"))(images=[rgba], return_tensors="np")
    np.testing.assert_array_equal(pipe.pixel_values([buf.getvalue()]), theirs["pixel_values"])

    # a processor that never converts (do_convert_rgb off) takes only RGB images, which Hugging Face's load_image
    # makes with a plain convert("RGB"): the colour under the transparency, as ours then gives, served too
    from transformers.image_utils import load_image as hf_load_image

    from vlm_export.runtime.images import ImageLimits, processed_images

    plain = AutoImageProcessor.from_pretrained(tiny_model_dir("llava-llama"), do_convert_rgb=False)
    gray = BytesIO()
    rgba.convert("L").save(gray, format="PNG")
    for data in (buf.getvalue(), gray.getvalue()):
        want = plain(images=[hf_load_image(Image.open(BytesIO(data)))], return_tensors="np")["pixel_values"]
        np.testing.assert_array_equal(processed_images(plain, [data], ImageLimits())["pixel_values"], want)
    pipe.image_processor = plain
    np.testing.assert_array_equal(pipe.pixel_values([buf.getvalue()]), plain(
        images=[hf_load_image(rgba)], return_tensors="np")["pixel_values"])
    assert not np.array_equal(pipe.pixel_values([buf.getvalue()]), theirs["pixel_values"])  # not over white


def test_every_path_makes_pixels_with_one_image_processor_backend(tiny_model_dir, tmp_path):
    """The build's checks, the in-process runtime and the served preprocess model load the image processor on Pillow
    (``IMAGE_PROCESSOR_BACKEND``) whether or not torchvision is installed: transformers would pick torchvision's where
    it is, whose pixels differ by a rounding step, and the served image has no torch - answers checked at build time
    would not be the ones served. (Where torchvision is installed this is the test that tells.)"""
    from transformers.image_processing_backends import PilBackend

    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.images import load_image_processor

    for name in ("gemma3", "qwen2_5_vl", "llava-siglip-qwen3"):
        folder = tiny_model_dir(name)
        assert isinstance(adapter_for(folder).load(folder).image_processor, PilBackend), name
        assert isinstance(load_image_processor(folder), PilBackend), name
