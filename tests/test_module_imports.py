"""Every module under ``ramnet/`` imports by its dotted path, and that path names it: no package
attribute rebinds a submodule's name to something else (``ramnet.ops.ram_attention`` was once both
the op package and the function, so ``ramnet.ops.ram_attention.spec`` did not resolve)."""

import functools
import importlib
import importlib.util
import pkgutil

import pytest

import ramnet


def _package_failed(name):
    # The walk imports each package to list its modules; by default it skips one that fails to import,
    # and with it all its modules.
    raise ImportError(f"package {name} does not import")


MODULES = sorted(
    info.name for info in pkgutil.walk_packages(ramnet.__path__, "ramnet.", onerror=_package_failed)
    if not info.name.endswith(".__main__")  # importing it runs the CLI
)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_by_its_dotted_path(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        missing = (err.name or "").split(".")[0]
        # An optional dependency that is not installed (triton, lm_eval, ...); a missing ramnet module fails.
        if missing and missing != "ramnet" and importlib.util.find_spec(missing) is None:
            pytest.skip(f"{name} needs {missing}, which is not installed")
        raise
    assert functools.reduce(getattr, name.split(".")[1:], ramnet) is module

