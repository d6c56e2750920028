import sys

from tokensvc.cli.main import main

sys.exit(main())
