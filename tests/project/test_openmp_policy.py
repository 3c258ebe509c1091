"""``import drm_lightning`` asks OpenMP for idle threads that spin briefly, then sleep, before torch (and its OpenMP
runtime) loads.

Why it matters and the measurement: the comment in ``drm_lightning/__init__.py``. The runtime reads
``OMP_WAIT_POLICY`` once, when it is loaded, so the test checks the order in a fresh interpreter: at the moment
``torch`` is first imported, the variable must already be set (a user's own value left alone).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import os, sys

    class Probe:
        seen = "torch never imported"

        def find_spec(self, name, path=None, target=None):
            if name == "torch" and Probe.seen == "torch never imported":
                Probe.seen = f"{os.environ.get('OMP_WAIT_POLICY')},{os.environ.get('GOMP_SPINCOUNT')}"
            return None

    sys.meta_path.insert(0, Probe())
    import drm_lightning.cli  # the command line's entry module (it imports torch lazily, in main())
    import torch  # what main() and every library entry point do next
    print(Probe.seen, torch.get_num_threads() >= 1)
    """
)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ({}, "PASSIVE,3000"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE,3000"),
        ({"GOMP_SPINCOUNT": "0"}, "PASSIVE,0"),
    ],
)
def test_wait_policy_is_set_before_torch_loads(preset: dict[str, str], expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(preset)
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"{expected} True"
