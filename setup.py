from setuptools import find_packages, setup

from jrouter import __version__

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
    ],
    extras_require={
        "test": [
            "pytest>=7,<10",
            "pytest-timeout>=2.1,<3",
            "hypothesis>=6.80,<7",
            "slixmpp>=1.8.4,<2",
            "mypy>=1.8,<2",
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
)
