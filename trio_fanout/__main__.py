import sys

from trio_fanout.cli import main

sys.exit(main())
