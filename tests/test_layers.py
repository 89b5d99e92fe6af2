"""The layers of docs/architecture.md hold: an app imports only the layers below it (import-linter)."""
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from tests.support import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(config), "--no-cache"], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_the_project_keeps_its_layers():
    result = lint_imports(ROOT, ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_import_against_the_layers_breaks_the_contract_even_inside_a_function(tmp_path):
    """Negative control: the same contracts, on a tree where the inventory reaches up into the console
    from inside a function (the kind of lazy import that hid the old cycles)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    for package in config["root_packages"]:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "console" / "tree.py").write_text("X = 1\n")
    (tmp_path / "inventory" / "watcher.py").write_text(textwrap.dedent("""
        def observe():
            from console.tree import X
            return X
    """))
    contracts = "\n".join(
        f'[[tool.importlinter.contracts]]\nname = "{c["name"]}"\ntype = "{c["type"]}"\n'
        + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in c.items() if k not in ("name", "type"))
        for c in config["contracts"]
    )
    toml = tmp_path / "pyproject.toml"
    toml.write_text(f"[tool.importlinter]\nroot_packages = {config['root_packages']!r}\n".replace("'", '"')
                    + contracts)
    result = lint_imports(tmp_path, toml)
    assert result.returncode != 0, result.stdout
    assert "inventory.watcher -> console.tree" in result.stdout
