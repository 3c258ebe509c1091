"""What the test modules that build and fit tiny experts share: the third-party warnings they are known to raise,
and one intra-op thread per test (``conftest.one_thread``).

Usage::

    from tests.helpers.expert_marks import EXPERT_TEST_MARKS
    pytestmark = EXPERT_TEST_MARKS
"""

from __future__ import annotations

import pytest

#: Known third-party deprecations (peft 0.21 on transformers 5; Lightning 2.6 on torch 2.13's pytree).
KNOWN_DEPRECATIONS = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]
#: The ``pytestmark`` of a module that fits tiny experts.
EXPERT_TEST_MARKS = [*KNOWN_DEPRECATIONS, pytest.mark.usefixtures("one_thread")]
