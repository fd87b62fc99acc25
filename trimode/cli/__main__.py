"""python -m trimode.cli"""

import sys

from trimode.cli import main

sys.exit(main())
