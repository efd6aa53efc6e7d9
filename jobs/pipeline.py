"""Ray job entry point: ``ray job submit -- python jobs/pipeline.py ...``, same flags as ``rnb run``.

Inside a Ray job RAY_ADDRESS points at the cluster, so the stages run there.
"""

import sys

from rnb_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
