"""`python -m aemagent.emulator` is `aemagent emulator`."""

import argparse
import sys

from aemagent.emulator.app import add_arguments, run

_parser = argparse.ArgumentParser(prog="aemagent emulator", description="A local IMS emulator.")
add_arguments(_parser)
sys.exit(run(_parser.parse_args()))
