#!/usr/bin/env python3
"""Visual odometry on a sequence: see `python run_vo.py --help`."""
import sys

from vo.cli import main

if __name__ == "__main__":
    sys.exit(main())
