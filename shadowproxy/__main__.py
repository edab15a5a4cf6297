import sys

from shadowproxy.commands.cli import main

sys.exit(main())
