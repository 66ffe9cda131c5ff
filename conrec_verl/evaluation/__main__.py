import sys

from conrec_verl.evaluation.cli import main

sys.exit(main())
