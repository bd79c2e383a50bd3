"""`python -m service ...` is `trimvlm ...`."""

from service.entrypoint import main

main()
