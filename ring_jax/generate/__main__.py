import sys

from ring_jax.generate.cli import main

sys.exit(main())
