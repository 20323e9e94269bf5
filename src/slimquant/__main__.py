import sys

from slimquant.cli.main import main

sys.exit(main())
