"""Ray job entry point: ``ray job submit -- python jobs/tokenize_shards.py --data REGROUP_OUT --output TOK_OUT --tokenizer byte ...``.

Same flags as ``rnb tokenize``; inside a Ray job RAY_ADDRESS points at the cluster.

Not named ``tokenize.py``: ``python jobs/<any>.py`` puts ``jobs/`` first on ``sys.path``, where a ``tokenize.py``
would shadow the standard library's ``tokenize`` (imported by ``inspect``) and break every other job.
"""

import sys
from pathlib import Path

# `ray job submit --working-dir . -- python jobs/...` runs this file without the package installed
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rnb_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tokenize", *sys.argv[1:]]))
