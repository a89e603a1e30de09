import os
import sys

from .cli import main

try:
    sys.exit(main())
except KeyboardInterrupt:  # Ctrl-C outside a stage (check, plan, weights, data verify): no traceback
    print("flowback: interrupted", file=sys.stderr)
    sys.exit(130)
except BrokenPipeError:  # `python -m flowback check | head`: the reader left; not an error of ours
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
