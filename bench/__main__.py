import sys

from bench.run import main

if __name__ == "__main__":  # spawned pool workers re-import this module
    sys.exit(main())
