#!/usr/bin/env python
"""Generate the deterministic synthetic dataset (see cutler/data/synthetic.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cutler.data.synthetic import main  # noqa: E402

if __name__ == "__main__":
    main()
