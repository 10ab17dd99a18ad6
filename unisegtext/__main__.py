import sys

from unisegtext.cli import main

sys.exit(main())
