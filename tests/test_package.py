"""The package imports without ComfyUI, exposes ComfyUI's entry points, and keeps its layering."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_FLASH_CORE = ("comfy", "folder_paths", "server", "nodes", "execution", "comfy_extras", "comfy_api")


def test_root_package_is_a_comfyui_entry_point():
    import sd35_flash

    assert isinstance(sd35_flash.NODE_CLASS_MAPPINGS, dict)
    assert isinstance(sd35_flash.NODE_DISPLAY_NAME_MAPPINGS, dict)
    assert (ROOT / sd35_flash.WEB_DIRECTORY).is_dir()


def test_importing_the_engine_loads_no_comfyui_module():
    code = ("import sys, sd35_flash, sd35_flash.flash_core.pipeline, sd35_flash.flash_core.cli; "
            f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN_IN_FLASH_CORE!r}]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level


def test_flash_core_imports_nothing_above_it():
    for path in (ROOT / "flash_core").rglob("*.py"):
        for module, level in _imports(path):
            top = module.split(".")[0]
            if level == 0:
                assert top not in FORBIDDEN_IN_FLASH_CORE, f"{path.relative_to(ROOT)} imports {module}"
            else:  # relative: may not climb out of flash_core (to the root package, nodes or training)
                depth = len(path.relative_to(ROOT / "flash_core").parts) - 1
                assert level <= depth + 1, f"{path.relative_to(ROOT)} imports {'.' * level}{module}"


def test_no_pickle_loading_in_the_package():
    package_files = [p for folder in ("flash_core", "nodes", "training") for p in (ROOT / folder).rglob("*.py")]
    for path in package_files + list(ROOT.glob("*.py")):
        text = path.read_text()
        assert "pickle.load" not in text, path
        assert "torch.load(" not in text or "weights_only=True" in text, path


def test_training_imports_only_the_engine():
    for path in (ROOT / "training").rglob("*.py"):
        for module, level in _imports(path):
            top = module.split(".")[0]
            if level == 0:
                assert top not in FORBIDDEN_IN_FLASH_CORE, f"{path.relative_to(ROOT)} imports {module}"
                continue
            package = path.relative_to(ROOT).parent.parts  # e.g. ("training", "toyworld")
            target = [*package[: len(package) - (level - 1)], *module.split(".")]
            assert target[0] in ("training", "flash_core"), \
                f"{path.relative_to(ROOT)} imports {'.' * level}{module} (outside training/ and flash_core/)"


def test_requirements_txt_lists_the_dependencies_but_torch():
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    normalise = {d.replace("'", '"').replace(" ", "") for d in declared if not d.startswith("torch")}
    assert {line.replace(" ", "") for line in listed} == normalise


def test_the_web_extension_is_served_once():
    """ComfyUI serves a pack's WEB_DIRECTORY under the folder's name and a pyproject ``[tool.comfy] web`` folder
    under the project's name: with both, every extension would register twice ("already registered")."""
    import tomllib

    import sd35_flash

    comfy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    assert sd35_flash.WEB_DIRECTORY and "web" not in comfy


def test_the_demo_data_is_declared_as_setuptools_expects():
    """Every folder of data files the wheel ships is a declared (namespace) package with its package data, so
    ``pip install`` prints no "Package would be ignored" warnings and the wheel carries the demo."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = {path.parent for path in (ROOT / "demo").rglob("*") if path.is_file()}
    for folder in shipped:
        package = ".".join(("sd35_flash", *folder.relative_to(ROOT).parts))
        assert package in setuptools["packages"], package
        patterns = setuptools["package-data"][package]
        for path in folder.iterdir():
            if path.is_file():
                assert any(path.match(pattern) for pattern in patterns), path


def test_every_code_package_is_declared():
    """``[tool.setuptools] packages`` is an explicit list: a folder of code missing from it is missing from the
    wheel (and the installed package fails at import), although the editable install and these tests pass."""
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for init in ROOT.glob("*/**/__init__.py"):
        if init.parts[len(ROOT.parts)] in ("flash_core", "nodes", "training"):
            package = ".".join(("sd35_flash", *init.parent.relative_to(ROOT).parts))
            assert package in declared, f"{package} is not in pyproject.toml's [tool.setuptools] packages"

