"""``python -m pyhf_dist`` is the ``pyhf-dist`` command."""

from pyhf_dist.cli import program

if __name__ == "__main__":
    program()
