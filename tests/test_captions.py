"""Caption metrics (pycocoevalcap's scorers behind one dataclass), the captioning folder format, easy-vqa's
template captions, and `vlm-export eval` on a captioning folder: PyTorch and the build side by side."""
from __future__ import annotations

import json
import shutil

import pytest

from test_policy import drifted_copy
from vlm_export.cli import main
from vlm_export.compare.captions import (CaptionGate, CaptionResult, CaptionScores, caption_prompt, score_captions,
                                         tokenize)
from vlm_export.datasets import (CaptionItem, caption_split, dataset_task, load_caption_items,
                                 write_caption_folder)
from vlm_export.datasets.captions import load_caption_folder
from vlm_export.errors import DatasetError, InputError
from vlm_export.manifest import read_manifest, write_manifest

ONE = pytest.approx(1.0, abs=1e-6)  # pycocoevalcap's BLEU smooths its counts by 1e-15 / 1e-9

SENTENCES = ["A red circle.", "A man's dog isn't here, 3.5 m/s & 50%.",
             'Blue-green "shape" -- on the left; e.g. U.S. cats!', "It's a 'quoted' word... yes?",
             "hello:world x-ray 1,000 cats"]


def test_tokenisation_is_explicit():
    assert [tokenize(s) for s in SENTENCES] == [
        "a red circle", "a man 's dog is n't here 3.5 m/s & 50 %", "blue-green shape on the left e.g. u.s. cats",
        "it 's a quoted word yes", "hello world x-ray 1,000 cats"]
    assert tokenize("A (brown) dog") == "a brown dog"  # PTBTokenizer -lowerCase would keep "-lrb-" / "-rrb-"


@pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer needs java")
def test_tokenisation_matches_ptbtokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ptb = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(SENTENCES)})
    assert [tokenize(s) for s in SENTENCES] == [ptb[i][0] for i in range(len(SENTENCES))]


def test_metrics_on_known_inputs():
    caps = ["a red circle on the left", "a blue square in the middle", "a green triangle at the top"]
    same = score_captions(caps, [[c] for c in caps])
    assert same.bleu == (ONE, ONE, ONE, ONE) and same.rouge_l == 1.0
    assert same.cider == pytest.approx(10.0)  # CIDEr-D's maximum: the caption equals all its references
    disjoint = score_captions(caps, [["x y z w v"]] * 3)
    assert max(disjoint.bleu) < 1e-9 and disjoint.rouge_l == 0.0 and disjoint.cider == 0.0
    # several references: the nearest counts (BLEU, ROUGE-L); a partial match scores in between
    part = score_captions(["a red circle", "a blue square"], [["a red circle", "a circle"], ["a blue shape"]])
    assert part.bleu[0] == pytest.approx(5 / 6) and 0 < part.rouge_l < 1
    assert score_captions(["A red circle."], [["a red circle"]]).rouge_l == 1.0  # compared after tokenisation
    with pytest.raises(InputError, match="tokenizer"):
        score_captions(caps, [[c] for c in caps], tokenizer="nltk")


def test_template_captions_from_easy_vqa_labels(tmp_path):
    items = caption_split("test", 3)
    assert items[0].references[0] == "a red triangle" and len(items[0].references) == 3  # image 0 is a red triangle
    name, loaded, note = load_caption_items("easy-vqa-captions", "test", spread=2)
    assert name == "easy-vqa-captions/test" and len(loaded) == 2 and "template captions" in note.lower()
    folder = write_caption_folder(tmp_path / "caps", items, note)
    assert [(i.references, i.prompt) for i in load_caption_folder(folder)] == [(i.references, None) for i in items]
    assert "not written by people" in (folder / "README.txt").read_text()
    assert dataset_task(folder) == "caption" and dataset_task("easy-vqa-captions") == "caption"
    assert dataset_task("easy-vqa", "caption") == "caption" and dataset_task("easy-vqa") == "vqa"


def _folder(tmp_path, rows, images=("a.png",)):
    from PIL import Image

    folder = tmp_path / "f"
    folder.mkdir(exist_ok=True)
    for name in images:
        Image.new("RGB", (8, 8), "red").save(folder / name)
    (folder / "captions.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    return folder


@pytest.mark.parametrize("rows, message", [
    ([{"image": "b.png", "captions": ["x"]}], r"captions.jsonl:1: image .*b.png not found"),
    ([{"image": "a.png", "captions": ["x"]}, {"image": "a.png", "captions": []}], r":2 needs \"captions\""),
    ([{"image": "a.png"}], "one or more non-empty reference captions"),
    ([{"image": "a.png", "captions": ["x", " "]}], "non-empty reference captions"),
    (["{not json"], "is not valid JSON"),
    ([{"image": "a.png", "captions": ["x"], "prompt": 3}], "prompt"),
    ([], "holds no captions"),
])
def test_a_bad_caption_folder_is_one_clear_error(tmp_path, rows, message):
    with pytest.raises(DatasetError, match=message):
        load_caption_folder(_folder(tmp_path, rows))


def test_a_broken_image_and_a_folder_of_neither_kind(tmp_path, capsys):
    folder = _folder(tmp_path, [{"image": "a.png", "caption": "x"}])
    data = (folder / "a.png").read_bytes()
    (folder / "a.png").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DatasetError, match="a.png cannot be read"):
        load_caption_folder(folder)
    # through the CLI: one line, exit 1, before any build is opened
    assert main(["eval", str(tmp_path / "no-build"), "--dataset", str(folder)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be read" in err[0], err
    (folder / "questions.jsonl").write_text("")
    with pytest.raises(InputError, match=r"--task vqa\|caption"):
        dataset_task(folder)
    with pytest.raises(DatasetError, match="questions.jsonl.*or captions.jsonl"):
        dataset_task(tmp_path)
    with pytest.raises(InputError, match="captioning set"):
        dataset_task("easy-vqa-captions", "vqa")


def test_eval_reports_captions_of_pytorch_and_the_build_side_by_side(tiny_build, tmp_path, capsys):
    """A tiny random LLaVA captions easy-vqa images (random text), PyTorch and fp32 ONNX Runtime alike:
    the build's captions scored against PyTorch's are at the maxima (BLEU 1, ROUGE-L 1, CIDEr equal to
    PyTorch's captions scored against themselves), every caption identical; both sides' scores against
    the template references are printed and recorded."""
    build = tmp_path / "build"
    shutil.copytree(tiny_build("llava-llama").path, build)
    items = [CaptionItem(i.image, i.references, "What is in the image?" if n == 0 else None)
             for n, i in enumerate(caption_split("test", 4))]
    folder = write_caption_folder(tmp_path / "caps", items, "template captions")

    assert main(["eval", str(build), "--dataset", str(folder)]) == 1  # the tiny build declares no caption prompt
    assert "--prompt" in capsys.readouterr().err
    manifest = read_manifest(build)
    manifest["generation"]["caption_prompt"] = "Describe the image."  # as a captioning model's build declares it
    write_manifest(build, manifest)

    assert main(["eval", str(build), "--dataset", str(folder), "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    for column in ("torch vs references", "onnxruntime vs references", "torch vs torch (maximum)",
                   "onnxruntime vs torch", "CIDEr"):
        assert column in out, out

    report = json.loads((build / "report.json").read_text())
    section = report["captions"]
    torch_result, ort = section["results"]
    assert torch_result["backend"] == "torch" and ort["backend"] == "onnxruntime" and section["images"] == 4
    captions = torch_result["captions"]
    assert any(c.strip() for c in captions) and ort["captions"] == captions and section["differing_captions"] == []
    assert ort["exact_match"] == 1.0 and torch_result["agreement"] is None
    ceiling = score_captions(captions, [[c] for c in captions]).to_dict()
    agreement = ort["agreement"]
    assert agreement["bleu_1"] == ONE and agreement["rouge_l"] == 1.0
    assert agreement == pytest.approx(ceiling) and torch_result["ceiling"] == pytest.approx(ceiling)
    assert ort["references"] == pytest.approx(torch_result["references"])
    # item 0 brought its own prompt, the others took the build's declared one
    assert section["prompts"] == {"What is in the image?": 1, "Describe the image.": 3} and "## Captions" in (build / "report.md").read_text()
    assert section["gate"]["passed"] and "caption gate" in out

    # the gate: references that are PyTorch's own captions (it scores the maximum); a build whose decoder
    # drifted captions otherwise, loses CIDEr and fails `eval` with exit code 1
    own = [CaptionItem(i.image, (c,), i.prompt) for i, c in zip(items, captions)]
    folder = write_caption_folder(tmp_path / "own", own)
    drifted = drifted_copy(build, tmp_path / "drifted", "lm_decoder", noise=0.3)
    assert main(["eval", str(drifted), "--dataset", str(folder), "--max-new-tokens", "12"]) == 1
    out = capsys.readouterr().out
    assert "FAILED captions: onnxruntime CIDEr" in out and "caption gate" in out
    recorded = json.loads((drifted / "report.json").read_text())["captions"]
    assert recorded["gate"]["passed"] is False and recorded["differing_captions"]


def test_caption_gate_on_made_up_results():
    def result(backend, cider):
        return CaptionResult(backend, "set", 10, 1.0, CaptionScores((0.5,) * 4, 0.5, cider))

    gate = CaptionGate(0.05)
    assert gate.judge(result("torch", 1.20), [result("onnxruntime", 1.16)]) == []
    [failure] = gate.judge(result("torch", 1.20), [result("onnxruntime", 1.16), result("tensorrt", 1.10)])
    assert failure.startswith("captions: tensorrt CIDEr 1.1000 vs torch 1.2000") and "0.1000" in failure


def test_the_caption_prompt_is_the_items_then_the_evals_then_the_builds():
    assert caption_prompt("<CAPTION>", "Describe.", "Caption:") == "<CAPTION>"
    assert caption_prompt(None, "Describe.", "Caption:") == "Describe."
    assert caption_prompt(None, None, "Caption:") == "Caption:"
    with pytest.raises(InputError, match="declares no captioning prompt.*--prompt"):
        caption_prompt(None, None, None)
