"""The top-level package: every public name resolves, and importing it stays light."""
import subprocess
import sys

import pytest

import tca_attention


@pytest.mark.parametrize("name", tca_attention.__all__)
def test_every_public_name_resolves(name):
    assert getattr(tca_attention, name) is not None


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tca_attention.nope  # noqa: B018


def test_names_used_in_error_messages_exist():
    from tca_attention.integration import hf

    assert callable(tca_attention.enable) and tca_attention.enable is hf.enable


def test_import_is_light():
    code = "import sys, tca_attention; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_python_example_is_the_example_file():
    """The README shows examples/quickstart.py (less its docstring): they cannot drift apart."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    block = readme.split("## Use it from Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    example = (root / "examples" / "quickstart.py").read_text().split('"""', 2)[2].lstrip("\n")
    assert block == example
    compile(block, "README", "exec")
