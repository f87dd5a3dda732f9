"""`python -m unmask.evaluation [lm-eval arguments...]`: the same as `unmask lm-eval ...`."""

import sys

from unmask.evaluation.cli import main

sys.exit(main())
