"""`python -m speech_units encode|learn-kmeans|convert-kmeans|overrides`: see speech_units/cli.py."""

import sys

from speech_units.cli import main

sys.exit(main())
