"""Generate the synthetic world: `python data/synthetic_world.py --out data/synthetic --seed 0 [--size ...]`.

A command-line wrapper; the generator is mllm_cl/synthetic/world.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make the repository root importable

from mllm_cl.synthetic import main  # noqa: E402

if __name__ == "__main__":
    main()
