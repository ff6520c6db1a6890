import sys

from dsaforge.cli import main

sys.exit(main())
