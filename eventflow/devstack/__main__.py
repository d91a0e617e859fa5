"""``python -m eventflow.devstack``: the development stack of ``make run``."""

from eventflow.devstack.supervisor import main

main()
