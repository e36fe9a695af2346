"""The one-file build's script: a frozen script runs outside any package, so it enters octomil_lite.__main__."""

from octomil_lite.__main__ import main

main()
