"""`python -m tiergate.devcluster ACTION`: works without installing the package (stdlib only)."""

import argparse
import sys

from .cmd import configure, run

parser = argparse.ArgumentParser(prog="python -m tiergate.devcluster", description=__doc__)
configure(parser)
sys.exit(run(parser.parse_args()))
