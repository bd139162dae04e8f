"""The README's recipe reference is generated from the schema and up to date."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_recipe_reference_up_to_date() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("ref", ROOT / "scripts/recipe_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.reference() in (ROOT / "README.md").read_text(), (
        "run: python scripts/recipe_reference.py --write"
    )


def test_readme_names_the_two_commands_and_ci_calls_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make quickstart" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci/run").read_text()
