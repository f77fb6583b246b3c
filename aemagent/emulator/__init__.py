"""The local IMS stand-in (`aemagent emulator`) and `aemagent demo`; loopback HTTP only."""
