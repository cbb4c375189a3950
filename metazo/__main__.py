import sys

from metazo.cli import main

sys.exit(main())
