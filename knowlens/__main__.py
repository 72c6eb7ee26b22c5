import sys

from knowlens.cli.main import main

sys.exit(main())
