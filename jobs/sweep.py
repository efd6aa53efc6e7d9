"""Ray job entry point: ``ray job submit -- python jobs/sweep.py ...``, same flags as ``rnb sweep``.

Inside a Ray job RAY_ADDRESS points at the cluster, so the stages run there.
"""

import sys

from rnb_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
