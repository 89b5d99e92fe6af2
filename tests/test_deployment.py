"""docker-compose.yml stays in step with the settings and the README."""
import re

import yaml

from tests.support import ROOT


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_every_production_service_and_xapisim_only_in_demo_profile():
    services = _compose()["services"]
    assert {"postgres", "redis", "web", "worker", "beat", "watcher", "follower", "xapisim"} <= set(services)
    assert services["xapisim"]["profiles"] == ["demo"]
    for name in ("web", "worker", "beat", "watcher", "follower"):
        assert "profiles" not in services[name]


def test_compose_environment_variables_are_read_by_the_settings_and_documented():
    settings_text = (ROOT / "eac" / "settings.py").read_text()
    readme = (ROOT / "README.md").read_text()
    env = _compose()["services"]["web"]["environment"]
    for var in env:
        assert re.search(rf'env(\.\w+)?\("{var}"', settings_text) or f'"{var}"' in settings_text, var
        assert f"`{var}`" in readme, f"{var} is not documented in README.md"
