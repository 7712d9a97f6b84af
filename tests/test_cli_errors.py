"""Bad input gets one clear line and a non-zero exit code, and nothing half-written is left."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vlm_export.build import BuildOptions, build
from vlm_export.cli import main
from vlm_export.errors import ParityError
from conftest import CliResult, assert_one_line_error  # noqa: E402


def run_process(*args: str) -> CliResult:
    """The CLI as a user runs it: its own process (real exit code, no traceback on stderr)."""
    proc = subprocess.run([sys.executable, "-m", "vlm_export.cli", *args], capture_output=True, text=True, timeout=300)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def test_help_has_examples():
    proc = run_process("--help")
    assert proc.returncode == 0 and "examples:" in proc.stdout and "vlm-export build" in proc.stdout


def test_unknown_architecture_lists_supported(tmp_path):
    """The one case run as its own process: the exit code and stderr a shell sees."""
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    assert_one_line_error(run_process("build", str(tmp_path), "--out", str(tmp_path / "out")),
                          "'bert'", "llava", "prefix")
    assert not (tmp_path / "out").exists()


def test_missing_model_folder(tmp_path, run_cli):
    assert_one_line_error(run_cli("build", str(tmp_path / "nope"), "--out", str(tmp_path / "out")), "does not exist")


def test_corrupt_weights(tmp_path, tiny_model_dir, run_cli):
    import shutil

    src = tiny_model_dir("llava-llama")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    assert_one_line_error(run_cli("build", str(broken), "--out", str(tmp_path / "out")), "cannot load the model weights")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_corrupt_generation_config(tmp_path, tiny_model_dir, run_cli):
    """transformers' from_pretrained only logs an unreadable generation_config.json and decodes with its
    defaults; the build refuses it instead of silently losing the model's stop tokens and settings."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir("llava-llama"), broken)
    (broken / "generation_config.json").write_text('{"eos_token_id": [2,')
    assert_one_line_error(run_cli("build", str(broken), "--out", str(tmp_path / "out")),
                          "cannot read", "generation_config.json", "fix it, or delete it")
    assert not (tmp_path / "out").exists()


def test_missing_config_json(tmp_path, tiny_model_dir, run_cli):
    import shutil

    broken = tmp_path / "noconfig"
    shutil.copytree(tiny_model_dir("llava-llama"), broken)
    (broken / "config.json").unlink()
    assert_one_line_error(run_cli("build", str(broken), "--out", str(tmp_path / "out")), "config.json is missing")


def test_missing_or_bad_chat_template(tmp_path, tiny_model_dir, run_cli):
    """--chat-template: a missing file, or a chat_template.json without the key, is one line before the
    model is even loaded; nothing is written."""
    model = str(tiny_model_dir("llava-llama"))
    assert_one_line_error(run_cli("build", model, "--out", str(tmp_path / "out"), "--chat-template",
                                  str(tmp_path / "nope.jinja")), "cannot read the chat template", "nope.jinja")
    (tmp_path / "chat_template.json").write_text('{"template": "{{ messages }}"}')
    assert_one_line_error(run_cli("build", model, "--out", str(tmp_path / "out"), "--chat-template",
                                  str(tmp_path / "chat_template.json")), 'has no "chat_template" key')
    assert not (tmp_path / "out").exists()


def test_unwritable_output(tiny_model_dir, tmp_path, run_cli):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_one_line_error(run_cli("build", str(tiny_model_dir("llava-llama")), "--out", str(blocker / "out")),
                          "cannot write the build folder")


def test_generate_errors(tiny_build, tmp_path, run_cli):
    build_dir = str(tiny_build("llava-llama").path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    assert_one_line_error(run_cli("generate", build_dir, "--image", str(bad), "--prompt", "hi"), "cannot be decoded")
    assert_one_line_error(run_cli("generate", build_dir, "--image", str(tmp_path / "none.png"), "--prompt", "hi"),
                          "does not exist")
    assert_one_line_error(run_cli("generate", build_dir, "--prompt", "word " * 400), "exceeds", "max_sequence")
    assert_one_line_error(run_cli("generate", build_dir, "--prompt", "   "), "empty")
    assert_one_line_error(run_cli("generate", str(tmp_path), "--prompt", "hi"), "not a vlm-export build folder")


def test_too_many_images_and_bad_params(tiny_build, capsys, tmp_path):
    build_dir = str(tiny_build("llava-llama").path)
    from skimage import data
    from PIL import Image

    path = str(tmp_path / "a.png")
    Image.fromarray(data.coffee()).save(path)
    assert main(["generate", build_dir, "--prompt", "hi", *["--image", path] * 3]) == 1
    assert "at most 2" in capsys.readouterr().err
    assert main(["generate", build_dir, "--prompt", "hi", "--top-p", "1.5"]) == 1
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", build_dir, "--prompt", "hi", "--top-k", "-1"]) == 1
    assert "top_k must be an integer" in capsys.readouterr().err
    assert main(["generate", build_dir, "--prompt", "hi", "--min-p", "2"]) == 1
    assert "min_p must be in [0, 1]" in capsys.readouterr().err
    assert main(["generate", build_dir, "--prompt", "hi", "--bad-word", "ok", "--bad-word", " "]) == 1
    assert "bad_words must be non-blank text" in capsys.readouterr().err
    assert main(["generate", build_dir, "--prompt", "hi", "--temperature", "1", "--top-k", "1", "--min-p", "0.5",
                 "--max-tokens", "3", "--json"]) == 0
    sampled = json.loads(capsys.readouterr().out)
    assert main(["generate", build_dir, "--prompt", "hi", "--max-tokens", "3", "--json"]) == 0
    assert sampled["token_ids"] == json.loads(capsys.readouterr().out)["token_ids"]  # top-k 1: the greedy answer
    assert main(["generate", build_dir, "--prompt", "hi", "--top-logprobs", "3"]) == 1
    assert "top_logprobs needs logprobs" in capsys.readouterr().err
    assert main(["generate", build_dir, "--prompt", "hi", "--presence-penalty", "3"]) == 1
    assert "presence_penalty must be in [-2, 2]" in capsys.readouterr().err


def test_generate_prints_logprobs(tiny_build, run_cli):
    """--logprobs lists each token under the answer (stderr), --json carries them in the result."""
    import json

    build_dir = str(tiny_build("llava-llama").path)
    args = ("generate", build_dir, "--prompt", "Tell me a story.", "--max-tokens", "5", "--logprobs",
            "--top-logprobs", "2")
    result = json.loads(run_cli(*args, "--json").stdout)
    assert len(result["logprobs"]) == result["completion_tokens"] == 5
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in result["logprobs"])
    printed = run_cli(*args)
    assert printed.returncode == 0 and printed.stdout.strip() == result["text"].strip()
    # (a progress line, "  loading ... ━━━ 1/1", reaches stderr too when the load is slow: not a logprob)
    lines = [line for line in printed.stderr.splitlines() if line.startswith("  ") and "━" not in line]
    assert len(lines) == 5 and f"{result['logprobs'][0]['logprob']:.3f}" in lines[0]


def test_existing_output_needs_force(tiny_build, tiny_model_dir, run_cli):
    existing = tiny_build("llava-llama").path
    assert_one_line_error(run_cli("build", str(tiny_model_dir("llava-llama")), "--out", str(existing)), "--force")
    assert (existing / "manifest.json").exists()


def test_force_never_deletes_a_folder_it_did_not_write(tiny_model_dir, run_cli, tmp_path, monkeypatch):
    model = str(tiny_model_dir("llava-llama"))
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "important.txt").write_text("keep")
    assert_one_line_error(run_cli("build", model, "--out", str(mine), "--force"), "not a build folder vlm-export wrote")
    assert (mine / "data" / "important.txt").read_text() == "keep"
    monkeypatch.chdir(mine / "data")  # a build folder or not, the folder a user stands in is never replaced
    assert_one_line_error(run_cli("build", model, "--out", str(mine), "--force"), "holds the current folder")
    assert_one_line_error(run_cli("build", model, "--out", str(mine / "data" / "important.txt" / "b")),
                          "important.txt is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no hidden folder left either


def test_failed_parity_leaves_no_build(tiny_model_dir, tmp_path):
    """Impossible tolerances: the build stops, names every failing stage, publishes nothing."""
    from PIL import Image
    from skimage import data

    from vlm_export.compare.parity import Sample

    out = tmp_path / "strict"
    impossible = {"atol": -1.0, "rtol": 0.0}
    # one sample with an image runs every stage (vision, projector, prefill, decode): all this test
    # judges; the default six only repeat that
    options = BuildOptions(parity_new_tokens=4,
                           tolerance_overrides={s: impossible for s in ("vision_encoder", "decode")},
                           samples=[Sample("Describe the picture.", (Image.fromarray(data.astronaut()),))])
    with pytest.raises(ParityError) as err:
        build(tiny_model_dir("prefix-llama"), out, options)
    message = str(err.value)
    assert "vision_encoder/image_features" in message and "decode/logits" in message
    assert "prefill" not in message
    assert not out.exists()
    assert (tmp_path / "strict.failed" / "report.md").exists()
    assert not (tmp_path / "strict.failed" / "manifest.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".strict")]


def test_accuracy_check_fails_before_export(tiny_model_dir, tmp_path):
    """A missing question folder or more questions than the set holds: one line, exit 1, nothing built."""
    from vlm_export.cli import main

    model = str(tiny_model_dir("llava-llama"))
    assert main(["build", model, "--out", str(tmp_path / "a"), "--eval-questions", "5",
                 "--eval-dataset", str(tmp_path / "nowhere")]) == 1
    assert main(["build", model, "--out", str(tmp_path / "b"), "--eval-questions", "100000"]) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_unexpected_failure_is_one_line_with_the_traceback_kept(run_cli, monkeypatch, tmp_path):
    """A bug (any exception no stage anticipated): one line saying so and where its traceback is, exit 70."""
    from vlm_export import cli

    def broken(args, progress):
        raise KeyError("a key nobody expected")

    monkeypatch.setitem(cli.COMMANDS, "adapters", broken)
    monkeypatch.delenv("VLM_EXPORT_TRACEBACK")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    result = run_cli("adapters")
    assert result.returncode == 70
    assert_one_line_error(result, "internal error (KeyError: 'a key nobody expected')", "please report it")
    saved = list(tmp_path.glob("vlm-export-traceback-*.txt"))
    assert len(saved) == 1 and "in broken" in saved[0].read_text() and "KeyError" in saved[0].read_text()
    monkeypatch.setenv("VLM_EXPORT_TRACEBACK", "1")
    with pytest.raises(KeyError):
        run_cli("adapters")


def test_a_quoted_library_error_keeps_its_reason_when_its_first_line_only_announces_it():
    """torch.export's "The following inconsistencies were found:" (MPT's ALiBi slice) said nothing alone."""
    from vlm_export.errors import first_line

    announced = ValueError("The following inconsistencies were found:\n\n  Eq(s70 + Max(0, -s15), 1) is inconsistent!\n"
                           "  more detail")
    assert first_line(announced) == ("ValueError: The following inconsistencies were found: "
                                     "Eq(s70 + Max(0, -s15), 1) is inconsistent!")
    assert first_line(RuntimeError("\x1b[31mone line\x1b[0m\nsecond")) == "RuntimeError: one line"


def test_a_chat_template_that_refuses_a_conversation_is_an_input_error(tiny_build):
    """Mistral's, Llama 2's and Gemma's templates raise on a system turn or roles that do not alternate:
    the caller's input, in the template's words (was exit 70, "a bug in vlm-export")."""
    from vlm_export.errors import InputError
    from vlm_export.runtime.generate import GenerationConfig, generate
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("llava-llama").path)
    pipe.tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                                    "{{ raise_exception('System role not supported') }}{% endif %}"
                                    "{{ m['content'] }}{% endfor %}")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    with pytest.raises(InputError, match="chat template refuses this conversation: System role not supported; .*"
                                         r"\(roles sent: system, user\)"):
        generate(pipe, conversation, [], GenerationConfig(max_new_tokens=2))
    assert generate(pipe, conversation[1:], [], GenerationConfig(max_new_tokens=2)).completion_tokens == 2
