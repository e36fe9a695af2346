"""Entry point of `python -m octomil_lite` and of the one-file build (scripts/build-onefile).

A frozen program has no `python -m`, so the conversion worker is this same executable started as
`octomil-lite __worker__ TASK` (see convert/sandbox.py: worker_command); it is dispatched here, before click is
imported. The one-file build enters through scripts/onefile/entry.py, since a frozen script has no package.
"""

import sys

WORKER_ARGUMENT = "__worker__"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == WORKER_ARGUMENT:
        from .convert import worker

        sys.argv = [sys.argv[0], *sys.argv[2:]]
        worker.main()
        return
    from .cli import main as cli

    cli(prog_name="octomil-lite")


if __name__ == "__main__":
    main()
