"""The packages' lazily imported public names: light modules stay light."""

import subprocess
import sys

import pytest

import engine
import orchestrator
import server


def test_light_modules_do_not_import_torch():
    """The admin CLI and the server's preparation process run without torch; a public name
    of the store must not pull it in either."""
    code = (
        "import sys, orchestrator, orchestrator.admin, server.prep_process\n"
        "orchestrator.Page\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names_resolve_to_their_modules():
    assert engine.SamplingParams.__module__ == "engine.sampling_params"
    assert server.ServerConfig.__module__ == "server.state"
    assert orchestrator.Product.__module__ == "orchestrator.product"


@pytest.mark.parametrize("package", [engine, server, orchestrator])
def test_unknown_names_raise_attribute_error(package):
    message = f"module '{package.__name__}' has no attribute 'nope'"
    with pytest.raises(AttributeError, match=message):
        package.nope  # noqa: B018
