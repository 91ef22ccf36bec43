"""The unit tests' one shared fixture: each framer (jrouter/wire/framing.py).

A module that reads streams says ``pytestmark = pytest.mark.usefixtures("framer")``
and runs once with each framer the readers may use: pyexpat's (PyPy's) and
the C one that setup.py builds for CPython. The C one missing here fails
the tests that ask for it: it is what jrouter runs on CPython, so a run
without it would not test jrouter.
"""

import platform

import pytest

from jrouter.wire import framing

#: The framers a CPython test run must have.
FRAMER_NAMES = ["c", "expat"] if platform.python_implementation() == "CPython" else ["expat"]


@pytest.fixture(scope="module", params=FRAMER_NAMES)
def framer(request):
    """The name of the framer every reader made in this module's tests uses."""
    name = request.param
    if name not in framing.FRAMERS:
        pytest.fail(f"framer {name!r} is not built here: run `pip install -e .` (setup.py builds it)")
    saved = framing.FRAMER
    framing.FRAMER = framing.FRAMERS[name]
    yield name
    framing.FRAMER = saved
