"""Test configuration: 8 CPU devices for sharding tests, set before any JAX computation."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
  "aqgov", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
  "ci", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "aqgov"))


import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _config_home(tmp_path_factory):
  """Run keys go to $XDG_CONFIG_HOME/aqgov/keys/: keep the tests' away from the user's config dir."""
  os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("config"))


@pytest.fixture(scope="session")
def governed_run(tmp_path_factory, _config_home):
  """One small closed governed run with credentials, policies and a profile, shared by the query,
  gate and export tests (read-only: copy it before changing anything)."""
  import lineage_helpers as lh

  return lh.governed_run(tmp_path_factory.mktemp("governed"))
