import sys

from ecospa_fx.cli import main

sys.exit(main())
