"""Command line: the same flags, defaults and exit codes as jabberd2's router.

Usage:
  jrouter [-D] [-c CONFIG] [-i ID]
  jrouter -h | --help
  jrouter --version

Options:
  -c CONFIG   config file to use [default: /etc/jabberd2/router.xml]
  -i ID       override the <id> config element
  -D          enable debug output
  -h --help   show this help and exit
  --version   show the version and exit
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Union

# docopt-ng in the venv, docopt 0.6.2 from Debian's python3-docopt in the
# package. Their docopt() differ only in the name of its third parameter
# (default_help / help), so parse_args passes it by position. Both raise
# DocoptExit (a SystemExit) on a usage error; parse_args catches it so that the
# exit code is jabberd2's 1 whichever is installed.
from docopt import DocoptExit, docopt

from jrouter import __version__

USAGE = __doc__[__doc__.index("Usage:"):]

EXIT_OK = 0
EXIT_USAGE = 1          # jabberd2: usage, cannot listen, bad filter file


def parse_args(argv: list[str]) -> Union[int, dict[str, Any]]:
    """Return the options, or an exit code when there is nothing to run."""
    if any(arg in ("-h", "--help", "-?") for arg in argv):
        # jabberd2 prints its usage on stdout and exits 1.
        print(f"jrouter - jabberd router replacement ({__version__})")
        print(USAGE, end="")
        return EXIT_USAGE
    try:
        options = docopt(USAGE, argv, False)    # third: no built-in -h handling
    except DocoptExit:
        print(USAGE, end="")
        return EXIT_USAGE
    if options["--help"]:       # an abbreviation such as --he, which docopt accepts
        return parse_args(["--help"])
    if options["--version"]:
        print(f"jrouter {__version__}")
        return EXIT_OK
    return options


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options = parse_args(argv)
    if isinstance(options, int):
        return options
    from jrouter.ops.app import run

    return run(options["-c"], id_override=options["-i"], debug=options["-D"])


if __name__ == "__main__":
    sys.exit(main())
