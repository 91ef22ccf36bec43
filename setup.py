import os
import platform

from setuptools import Extension, find_packages, setup

from jrouter import __version__

#: The modules every packet passes through: with JROUTER_COMPILE=1 they are
#: compiled to C extensions by mypyc, from these same sources and their types
#: (docs/architecture.md, compiled). Everything else stays Python.
COMPILED = [
    "jrouter/wire/xmlstream.py", "jrouter/wire/connection.py", "jrouter/wire/outbox.py",
    "jrouter/wire/jid.py", "jrouter/wire/counters.py", "jrouter/wire/xmlwrite.py",
    "jrouter/routing/router.py", "jrouter/routing/accept.py", "jrouter/routing/ports.py",
    "jrouter/routing/placement.py", "jrouter/routing/table.py", "jrouter/routing/filter.py",
    "jrouter/routing/policy.py", "jrouter/routing/balance.py", "jrouter/routing/redelivery.py",
    "jrouter/routing/affinity.py", "jrouter/routing/membership.py", "jrouter/ops/server.py",
]


def compiled_modules() -> list:
    if os.environ.get("JROUTER_COMPILE") != "1":
        return []
    from mypyc.build import mypycify

    # One shared library for them all, named after the package.
    return mypycify(["--config-file", "mypy.ini", *COMPILED], opt_level="3", group_name="jrouter")


def framer_module() -> list:
    """The C framer (jrouter/wire/framing.py), against the system's libexpat
    (Debian: libexpat1-dev). Not on PyPy, where framing.py's pyexpat one
    runs faster than a C extension can through PyPy's emulation of the C API."""
    if platform.python_implementation() != "CPython":
        return []
    return [Extension("jrouter.wire._expatframe", ["jrouter/wire/_expatframe.c"], libraries=["expat"],
                      extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter"])]


setup(
    name="jrouter",
    version=__version__,
    description="Drop-in replacement for the jabberd2 router daemon, in Python with gevent",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="GPL-2.0-or-later",
    python_requires=">=3.9",     # Debian's pypy3 is 3.9 (docs/architecture.md, PyPy)
    packages=find_packages(exclude=["tests", "tests.*"]),
    install_requires=[
        "gevent>=22.10,<27",
        "lxml>=4.9,<7",
        "configobj>=5.0.8,<6",
        "docopt-ng>=0.9,<1",
        "prometheus_client>=0.16,<1",
        # mypyc_attr only: what a compiled class must stay (xmlstream.NamespaceContext)
        "mypy_extensions>=0.4.3",
    ],
    extras_require={
        "test": [
            "pytest>=7,<10",
            "pytest-timeout>=2.1,<3",
            "hypothesis>=6.80,<7",
            "slixmpp>=1.8.4,<2",
            "mypy>=2.4.1,<3",     # 1.19-1.20: mypyc leaks the left operand of bytes + bytes
            "types-lxml>=2026.2,<2027",
            # scripts/jrouter-fuzz only (binary wheels for Linux; no CI test needs it)
            "atheris>=3.0,<4; platform_system == 'Linux'",
        ],
    },
    entry_points={"console_scripts": [
        "jrouter = jrouter.ops.cli:main",
        "jrouter-status = jrouter.ops.status_cli:main",
    ]},
    data_files=[("share/man/man8", ["man/jrouter.8"])],
    ext_modules=framer_module() + compiled_modules(),
)
