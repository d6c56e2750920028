import sys

from tokensvc.cli import main

sys.exit(main())
