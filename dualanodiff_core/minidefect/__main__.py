import sys

from .procedural import main

sys.exit(main())
