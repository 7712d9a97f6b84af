"""The default set-up installs only what the demo needs (scripts/setup.sh); a command that needs an
optional extra says which, in one line, instead of a traceback."""
import subprocess
import sys
from pathlib import Path

from vlm_export import cli

ROOT = Path(__file__).resolve().parents[1]


def test_a_missing_extra_is_named_in_one_line(monkeypatch, capsys):
    # None in sys.modules makes `import tritonclient...` raise ModuleNotFoundError, as without the extra
    for name in [m for m in sys.modules if m == "tritonclient" or m.startswith("tritonclient.")] + ["tritonclient"]:
        monkeypatch.setitem(sys.modules, name, None)
    code = cli.main(["ask", "--url", "grpc://127.0.0.1:9", "--prompt", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "'tritonclient'" in err[0] and "vlm-export[serve]" in err[0] and "--serve" in err[0]


def test_caption_metrics_without_their_extra(monkeypatch, capsys, tmp_path):
    """`eval` on a captioning folder without pycocoevalcap: the one-line hint, before any model loads."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "captions.jsonl").write_text('{"image": "a.png", "captions": ["a black square"]}')
    for name in [m for m in sys.modules if m.startswith("pycocoevalcap.")] + ["pycocoevalcap"]:
        monkeypatch.setitem(sys.modules, name, None)
    assert cli.main(["eval", str(tmp_path / "no-build"), "--dataset", str(tmp_path), "--prompt", "Describe."]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vlm-export[captions]" in err[0] and "--captions" in err[0], err


def test_other_missing_modules_are_not_disguised():
    err = ModuleNotFoundError("No module named 'not_an_extra'", name="not_an_extra")
    assert cli.missing_extra(err) is None
    assert "vlm-export[peer]" in cli.missing_extra(ModuleNotFoundError(name="onnxruntime_genai.models"))


def test_setup_refuses_an_unknown_option():
    run = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--everything"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert run.returncode == 2 and "unknown option --everything" in run.stderr



def test_the_set_up_constraints_are_one_tested_environment():
    """scripts/constraints.txt pins a fresh set-up to the versions the tests passed with: every package
    vlm-export and its extras need is pinned (a release reaching the index cannot change a fresh clone),
    torch is not (TORCH_SPEC), and the image's pins (deploy/requirements.txt) are the same versions. This
    environment differing from it (a local upgrade) is reported, not failed."""
    import re
    import tomllib
    import warnings
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    def pins_of(path: Path) -> dict[str, str]:
        lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
        assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", line) for line in lines), path
        return {canonicalize_name(name): v for name, v in (line.split("==") for line in lines)}

    pins = pins_of(ROOT / "scripts" / "constraints.txt")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = ("demo", "serve", "captions", "test")  # what setup.sh --tests installs
    assert f'--tests) EXTRAS="{",".join(extras)}"' in (ROOT / "scripts" / "setup.sh").read_text()
    needed = [Requirement(r) for r in project["dependencies"] + [r for e in extras
                                                                 for r in project["optional-dependencies"][e]]]
    unpinned = {canonicalize_name(r.name) for r in needed} - set(pins) - {"torch"}
    assert not unpinned, f"scripts/constraints.txt lacks {sorted(unpinned)}"
    assert "torch" not in pins and "vlm-export" not in pins
    for req in needed:  # each pin meets pyproject's own range
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is not None:
            assert req.specifier.contains(pinned, prereleases=True), (str(req), pinned)
    image = pins_of(ROOT / "deploy" / "requirements.txt")
    assert {name: v for name, v in image.items() if pins.get(name) != v} == {}  # the image runs the same versions
    moved = {}
    for name, pinned in pins.items():
        try:
            here = version(name)
        except PackageNotFoundError:
            continue
        if here != pinned:
            moved[name] = (pinned, here)
    if moved:
        warnings.warn(f"this environment differs from scripts/constraints.txt: {moved}")
