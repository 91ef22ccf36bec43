import sys

from jrouter.ops.cli import main

sys.exit(main())
