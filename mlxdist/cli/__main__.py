import sys

from mlxdist.cli import main

sys.exit(main())
