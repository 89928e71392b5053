import sys

from dlqproc.cli import main

sys.exit(main())
