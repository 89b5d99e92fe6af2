from tests.protection.fixtures import *  # noqa: F403
