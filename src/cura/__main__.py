import sys

from cura.cli import main

sys.exit(main())
