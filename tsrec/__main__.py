import sys

from tsrec.cli import main

sys.exit(main())
