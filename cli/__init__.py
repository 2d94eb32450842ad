"""Pinnace command line: `pinnace serve`, `pinnace render`, `pinnace operator`."""
