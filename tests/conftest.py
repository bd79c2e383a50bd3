import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEACHER_DIR = REPO / "models" / "trimvlm-teacher" / "1"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tests write generated scenes and image caches to their own folder, never the user's."""
    if "TRIMVLM_CACHE" not in os.environ:
        os.environ["TRIMVLM_CACHE"] = str(tmp_path_factory.mktemp("trimvlm-cache"))
    yield
